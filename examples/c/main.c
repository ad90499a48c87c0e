/*
 * A minimal embedding of xsam from C: load a model, open a session on an image file, run one
 * referring request and print the answer and the mask areas.
 *
 * Build (from the repository root):
 *   cargo build --release && cc examples/c/main.c -Iinclude -Ltarget/release -lxsam -Wl,-rpath,$PWD/target/release -o xsam-example
 * Run:
 *   ./xsam-example MODEL_DIR IMAGE "the red circle"
 * (a small random model for trying it: `cargo run --release -- init --preset tiny --out models/tiny`).
 */
#include "xsam.h"

#include <stdio.h>
#include <stdlib.h>

static uint8_t * read_file(const char * path, size_t * size) {
    FILE * f = fopen(path, "rb");
    uint8_t * buf = NULL;
    long n;
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) > 0) {
        rewind(f);
        buf = (uint8_t *) malloc((size_t) n);
        if (buf && fread(buf, 1, (size_t) n, f) != (size_t) n) {
            free(buf);
            buf = NULL;
        }
        *size = (size_t) n;
    }
    fclose(f);
    return buf;
}

int main(int argc, char ** argv) {
    xsam_model * model = NULL;
    xsam_session * session = NULL;
    xsam_result * result = NULL;
    xsam_request_params req;
    size_t size = 0, n_masks = 0, need = 0, i;
    uint8_t * bytes;
    char * text;
    int rc = 1;

    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL_DIR IMAGE EXPRESSION\n", argv[0]);
        return 2;
    }
    printf("xsam %s\n", xsam_version());

    if (xsam_model_load(argv[1], xsam_model_default_params(), &model) != XSAM_OK) {
        fprintf(stderr, "%s\n", xsam_last_error());
        return 1;
    }
    bytes = read_file(argv[2], &size);
    if (!bytes) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        goto done;
    }
    if (xsam_session_from_image(model, bytes, size, &session) != XSAM_OK) {
        fprintf(stderr, "%s\n", xsam_last_error());
        free(bytes);
        goto done;
    }
    free(bytes);

    req = xsam_request_default_params();
    req.task = XSAM_TASK_REFERRING;
    req.text = argv[3];
    req.forced = true; /* answer "Sure, <SEG>." without generating */
    if (xsam_session_run(session, req, &result) != XSAM_OK) {
        fprintf(stderr, "%s\n", xsam_last_error());
        goto done;
    }

    xsam_result_text(result, NULL, 0, &need); /* query the size, then copy */
    text = (char *) malloc(need);
    if (text && xsam_result_text(result, text, need, NULL) == XSAM_OK) {
        printf("answer: %s\n", text);
    }
    free(text);

    xsam_result_n_masks(result, &n_masks);
    for (i = 0; i < n_masks; i++) {
        xsam_mask_info info;
        if (xsam_result_mask_info(result, i, &info) == XSAM_OK) {
            printf("mask %zu: %s score %.3f, %llu of %ux%u pixels\n", i, info.label, (double) info.score,
                   (unsigned long long) info.area, info.width, info.height);
        }
    }
    rc = 0;

done:
    xsam_result_free(result);
    xsam_session_free(session);
    xsam_model_free(model);
    return rc;
}
