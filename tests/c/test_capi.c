/*
 * The C API end to end, driven by tests/c_api.rs:
 *
 *     test_capi MODEL_DIR IMAGE_PNG WEIGHTS KV_END TOTAL
 *
 * Loads the model (checking the progress values), opens a session on a synthetic RGB8 image (the
 * same pixels as IMAGE_PNG, which also gets a session from its encoded bytes), runs a referring, a
 * panoptic and a short generated conversation request, prints every result, then runs the soft
 * conditions (aborts, cancelled loads) and the error cases. WEIGHTS, KV_END and TOTAL are memory
 * budgets in bytes: the weights alone, weights + KV pool, and weights + KV pool + arena (the Rust
 * side's Model::memory_plan). Output lines (parsed by the Rust side, which checks them against the
 * Rust API on the same inputs):
 *
 *     result NAME JSON
 *     text NAME TEXT
 *     mask NAME INDEX class=C kind=K score=S segment=G size=WxH area=A rle=c0,c1,... label=L
 *     err NAME CODE MESSAGE
 *
 * Exits non-zero on the first unexpected return code or inconsistency (with a message on stderr).
 * Frees everything, so valgrind --leak-check=full finds nothing definitely lost.
 */
#include "xsam.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define W 64
#define H 48

static int failures = 0;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s (last error: %s)\n", __FILE__,     \
                    __LINE__, #cond, xsam_last_error());                               \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

/* The test image: a gradient with a red square and a green disc (tests/c_api.rs: `image`). */
static void make_image(uint8_t * px) {
    int x, y;
    for (y = 0; y < H; y++) {
        for (x = 0; x < W; x++) {
            uint8_t * p = px + 3 * (y * W + x);
            p[0] = (uint8_t) (x * 255 / W);
            p[1] = (uint8_t) (y * 255 / H);
            p[2] = (uint8_t) ((x * y) % 256);
            if (x >= 8 && x < 24 && y >= 10 && y < 26) {
                p[0] = 220; p[1] = 30; p[2] = 30;
            }
            if ((x - 44) * (x - 44) + (y - 30) * (y - 30) < 100) {
                p[0] = 30; p[1] = 200; p[2] = 60;
            }
        }
    }
}

static uint8_t * read_file(const char * path, size_t * size) {
    FILE * f = fopen(path, "rb");
    uint8_t * buf;
    long n;
    CHECK(f != NULL);
    CHECK(fseek(f, 0, SEEK_END) == 0);
    n = ftell(f);
    CHECK(n > 0);
    rewind(f);
    buf = (uint8_t *) malloc((size_t) n);
    CHECK(buf != NULL);
    CHECK(fread(buf, 1, (size_t) n, f) == (size_t) n);
    fclose(f);
    *size = (size_t) n;
    return buf;
}

/* Prints a result and checks its readers agree with each other (bitmap vs area vs RLE). */
static void print_result(const char * name, const xsam_result * r) {
    size_t need = 0, n = 0, i;
    char * buf;
    uint32_t iw = 0, ih = 0;

    CHECK(xsam_result_json(r, NULL, 0, &need) == XSAM_BUFFER_TOO_SMALL);
    CHECK(need > 1);
    buf = (char *) malloc(need);
    CHECK(xsam_result_json(r, buf, need, NULL) == XSAM_OK);
    CHECK(strlen(buf) + 1 == need);
    printf("result %s %s\n", name, buf);
    free(buf);

    CHECK(xsam_result_text(r, NULL, 0, &need) != XSAM_OK || need == 1);
    buf = (char *) malloc(need);
    CHECK(xsam_result_text(r, buf, need, &need) == XSAM_OK);
    printf("text %s %s\n", name, buf);
    free(buf);

    CHECK(xsam_result_image_size(r, &iw, &ih) == XSAM_OK);
    CHECK(iw == W && ih == H);
    CHECK(xsam_result_n_masks(r, &n) == XSAM_OK);
    for (i = 0; i < n; i++) {
        xsam_mask_info info;
        uint8_t * bits;
        uint64_t * counts;
        size_t n_counts = 0, k, sum = 0, pos = 0;
        int on = 0;

        CHECK(xsam_result_mask_info(r, i, &info) == XSAM_OK);
        CHECK(info.width == W && info.height == H);
        bits = (uint8_t *) malloc((size_t) W * H);
        CHECK(xsam_result_mask_bitmap(r, i, bits, (size_t) W * H) == XSAM_OK);
        for (k = 0; k < (size_t) W * H; k++) {
            CHECK(bits[k] <= 1);
            sum += bits[k];
        }
        CHECK(sum == info.area);

        CHECK(xsam_result_mask_rle(r, i, NULL, 0, &n_counts) == XSAM_BUFFER_TOO_SMALL);
        counts = (uint64_t *) malloc(n_counts * sizeof(uint64_t));
        CHECK(xsam_result_mask_rle(r, i, counts, n_counts, &k) == XSAM_OK && k == n_counts);
        /* the RLE (column-major, off first) decodes to the bitmap */
        for (k = 0; k < n_counts; k++) {
            uint64_t c;
            for (c = 0; c < counts[k]; c++, pos++) {
                size_t y = pos % H, x = pos / H;
                CHECK(x < W && bits[y * W + x] == on);
            }
            on = !on;
        }
        CHECK(pos == (size_t) W * H);

        printf("mask %s %zu class=%d kind=%d score=%.9g segment=%u size=%ux%u area=%llu rle=",
               name, i, info.class_index, info.kind, (double) info.score, info.segment_id,
               info.width, info.height, (unsigned long long) info.area);
        for (k = 0; k < n_counts; k++) {
            printf("%s%llu", k ? "," : "", (unsigned long long) counts[k]);
        }
        printf(" label=%s\n", info.label);
        free(counts);
        free(bits);
    }
}

static void expect(const char * name, int32_t got, int32_t want) {
    printf("err %s %d %s\n", name, got, xsam_last_error());
    if (got != want) {
        fprintf(stderr, "%s: expected %d, got %d (%s)\n", name, want, got, xsam_last_error());
        failures++;
    }
}

/* Counts polls; true (abort) on poll number stop_at (1-based). */
typedef struct {
    int calls;
    int stop_at;
} abort_state;

static bool abort_at(void * user_data) {
    abort_state * a = (abort_state *) user_data;
    return ++a->calls == a->stop_at;
}

/* Records the progress values; false (cancel) once a value reaches cancel_at. */
typedef struct {
    float values[256];
    int n;
    float cancel_at;
} progress_log;

static bool log_progress(float progress, void * user_data) {
    progress_log * log = (progress_log *) user_data;
    if (log->n < 256) {
        log->values[log->n] = progress;
    }
    log->n++;
    return progress < log->cancel_at;
}

static uint64_t parse_u64(const char * s) {
    char * end = NULL;
    unsigned long long v = strtoull(s, &end, 10);
    CHECK(end != s && *end == '\0');
    return (uint64_t) v;
}

int main(int argc, char ** argv) {
    static uint8_t px[W * H * 3];
    const char * classes[] = { "square", "disc" };
    const char * stuff[] = { "background" };
    xsam_model_params mp = xsam_model_default_params();
    xsam_request_params rp;
    xsam_model * model = NULL;
    xsam_session * session = NULL;
    xsam_session * png_session = NULL;
    xsam_result * res = NULL;
    uint8_t * png;
    size_t png_size = 0;
    static progress_log log;
    abort_state ab;
    uint64_t budget_weights, budget_kv_end, budget_total;
    int i, between = 0;

    if (argc != 6) {
        fprintf(stderr, "usage: %s MODEL_DIR IMAGE_PNG WEIGHTS KV_END TOTAL\n", argv[0]);
        return 2;
    }
    budget_weights = parse_u64(argv[3]);
    budget_kv_end = parse_u64(argv[4]);
    budget_total = parse_u64(argv[5]);
    printf("version %s\n", xsam_version());
    make_image(px);

    /* progress: 0 first, never decreasing, several values between, exactly 1 last */
    log.cancel_at = 2.0f;
    mp.progress_callback = log_progress;
    mp.progress_callback_user_data = &log;
    CHECK(xsam_model_load(argv[1], mp, &model) == XSAM_OK && model != NULL);
    CHECK(strcmp(xsam_last_error(), "") == 0);
    CHECK(log.n >= 3 && log.n <= 256);
    CHECK(log.values[0] == 0.0f && log.values[log.n - 1] == 1.0f);
    printf("progress");
    for (i = 0; i < log.n; i++) {
        CHECK(i == 0 || log.values[i] >= log.values[i - 1]);
        between += log.values[i] > 0.0f && log.values[i] < 1.0f;
        printf(" %.9g", (double) log.values[i]);
    }
    printf("\n");
    CHECK(between >= 3);
    CHECK(xsam_session_from_rgb8(model, px, sizeof px, W, H, &session) == XSAM_OK);
    png = read_file(argv[2], &png_size);
    CHECK(xsam_session_from_image(model, png, png_size, &png_session) == XSAM_OK);
    free(png);

    /* referring, on the raw pixels and on the PNG */
    rp = xsam_request_default_params();
    rp.task = XSAM_TASK_REFERRING;
    rp.text = "the red square";
    rp.forced = true;
    CHECK(xsam_session_run(session, rp, &res) == XSAM_OK);
    print_result("referring", res);
    CHECK(xsam_result_free(res) == XSAM_OK);
    CHECK(xsam_session_run(png_session, rp, &res) == XSAM_OK);
    print_result("referring_png", res);
    CHECK(xsam_result_free(res) == XSAM_OK);

    /* panoptic */
    rp = xsam_request_default_params();
    rp.task = XSAM_TASK_PANOPTIC;
    rp.classes = classes;
    rp.n_classes = 2;
    rp.stuff = stuff;
    rp.n_stuff = 1;
    rp.forced = true;
    rp.threshold = 0.0;
    CHECK(xsam_session_run(session, rp, &res) == XSAM_OK);
    print_result("panoptic", res);
    /* the result outlives nothing it depends on: free the session's siblings later */

    /* a generated answer (greedy, a few tokens) */
    {
        xsam_result * conv = NULL;
        rp = xsam_request_default_params();
        rp.task = XSAM_TASK_CONVERSATION;
        rp.text = "What is in the image?";
        rp.max_new_tokens = 4;
        CHECK(xsam_session_run(session, rp, &conv) == XSAM_OK);
        print_result("conversation", conv);
        CHECK(xsam_result_free(conv) == XSAM_OK);
    }

    /* ---- soft conditions and errors ---- */
    {
        xsam_model * m2 = (xsam_model *) 1;
        xsam_session * s2 = (xsam_session *) 1;
        xsam_result * r2 = (xsam_result *) 1;
        xsam_model_params bad = xsam_model_default_params();
        xsam_mask_view vp;
        uint8_t mask[W * H];
        char small[4];
        size_t need = 0, n = 0;
        uint8_t bits[8];
        xsam_mask_info info;
        static const uint8_t junk[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };

        expect("load_null_path", xsam_model_load(NULL, mp, &m2), XSAM_ERR_NULL);
        CHECK(m2 == NULL);
        expect("load_null_out", xsam_model_load(argv[1], mp, NULL), XSAM_ERR_NULL);
        bad.device = 7;
        expect("load_bad_device", xsam_model_load(argv[1], bad, &m2), XSAM_ERR_INVALID_ARG);
        expect("load_missing_dir", xsam_model_load("/nonexistent/xsam-model", mp, &m2), XSAM_ERR_IO);
        bad = xsam_model_default_params();
        bad.memory_budget = 1;
        expect("load_budget", xsam_model_load(argv[1], bad, &m2), XSAM_ERR_OUT_OF_MEMORY);

        expect("session_null_model", xsam_session_from_rgb8(NULL, px, sizeof px, W, H, &s2), XSAM_ERR_NULL);
        CHECK(s2 == NULL);
        expect("session_wrong_size", xsam_session_from_rgb8(model, px, sizeof px - 1, W, H, &s2),
               XSAM_ERR_INVALID_ARG);
        expect("session_zero_width", xsam_session_from_rgb8(model, px, 0, 0, H, &s2), XSAM_ERR_INVALID_ARG);
        expect("session_null_pixels", xsam_session_from_rgb8(model, NULL, sizeof px, W, H, &s2), XSAM_ERR_NULL);
        expect("session_bad_image", xsam_session_from_image(model, junk, sizeof junk, &s2), XSAM_ERR_INPUT);
        expect("session_wrong_handle", xsam_session_from_rgb8((xsam_model *) session, px, sizeof px, W, H, &s2),
               XSAM_ERR_INVALID_ARG);

        rp = xsam_request_default_params();
        rp.task = XSAM_TASK_REFERRING;
        rp.text = "x";
        rp.forced = true;
        expect("run_null_session", xsam_session_run(NULL, rp, &r2), XSAM_ERR_NULL);
        CHECK(r2 == NULL);
        expect("run_null_out", xsam_session_run(session, rp, NULL), XSAM_ERR_NULL);
        rp.task = 99;
        expect("run_bad_task", xsam_session_run(session, rp, &r2), XSAM_ERR_INVALID_ARG);
        rp.task = -1;
        expect("run_negative_task", xsam_session_run(session, rp, &r2), XSAM_ERR_INVALID_ARG);
        rp.task = XSAM_TASK_SEMANTIC;
        rp.n_classes = 2;
        rp.classes = NULL;
        expect("run_null_classes", xsam_session_run(session, rp, &r2), XSAM_ERR_NULL);
        rp.task = XSAM_TASK_REFERRING;
        rp.n_classes = 0;
        rp.max_new_tokens = 0;
        expect("run_zero_max_new_tokens", xsam_session_run(session, rp, &r2), XSAM_ERR_INVALID_ARG);
        rp.max_new_tokens = 8;
        memset(mask, 0, sizeof mask);
        mask[5 * W + 5] = 255;
        vp.data = mask;
        vp.size = sizeof mask - 1;
        vp.width = W;
        vp.height = H;
        rp.task = XSAM_TASK_INTERACTIVE;
        rp.vprompts = &vp;
        rp.n_vprompts = 1;
        expect("run_vprompt_wrong_size", xsam_session_run(session, rp, &r2), XSAM_ERR_INVALID_ARG);
        vp.size = sizeof mask;
        vp.width = W / 2;
        vp.height = H * 2;
        expect("run_vprompt_wrong_image_size", xsam_session_run(session, rp, &r2), XSAM_ERR_INPUT);
        rp.task = XSAM_TASK_REFERRING;
        vp.width = W;
        vp.height = H;
        expect("run_vprompt_wrong_task", xsam_session_run(session, rp, &r2), XSAM_ERR_INPUT);
        rp.n_vprompts = 0;

        /* aborts: at the first poll (nothing runs), before the mask decoder (the 5th poll of a
           forced segmentation request), after two generated tokens (polls: start, prompt,
           prefill, after token 1, after token 2) */
        rp.text = "the red square";
        rp.abort_callback = abort_at;
        rp.abort_callback_user_data = &ab;
        ab.calls = 0;
        ab.stop_at = 1;
        r2 = (xsam_result *) 1;
        expect("run_aborted_first_poll", xsam_session_run(session, rp, &r2), XSAM_ABORTED);
        CHECK(r2 == NULL && ab.calls == 1);
        ab.calls = 0;
        ab.stop_at = 5;
        r2 = (xsam_result *) 1;
        expect("run_aborted_mask_decoder", xsam_session_run(session, rp, &r2), XSAM_ABORTED);
        CHECK(r2 == NULL && ab.calls == 5);
        rp = xsam_request_default_params();
        rp.task = XSAM_TASK_CONVERSATION;
        rp.text = "What is in the image?";
        rp.max_new_tokens = 4;
        rp.abort_callback = abort_at;
        rp.abort_callback_user_data = &ab;
        ab.calls = 0;
        ab.stop_at = 5;
        r2 = (xsam_result *) 1;
        expect("run_aborted_tokens", xsam_session_run(session, rp, &r2), XSAM_ABORTED);
        CHECK(r2 == NULL && ab.calls == 5);
        /* the session is unaffected: the same referring result as before the aborts */
        rp = xsam_request_default_params();
        rp.task = XSAM_TASK_REFERRING;
        rp.text = "the red square";
        rp.forced = true;
        CHECK(xsam_session_run(session, rp, &r2) == XSAM_OK);
        print_result("referring_after_abort", r2);
        CHECK(xsam_result_free(r2) == XSAM_OK);
        r2 = NULL;

        /* cancelled loads: at the first report, and part way */
        bad = xsam_model_default_params();
        bad.progress_callback = log_progress;
        bad.progress_callback_user_data = &log;
        log.n = 0;
        log.cancel_at = 0.0f;
        m2 = (xsam_model *) 1;
        expect("load_cancelled", xsam_model_load(argv[1], bad, &m2), XSAM_ABORTED);
        CHECK(m2 == NULL && log.n == 1);
        log.n = 0;
        log.cancel_at = 0.5f;
        m2 = (xsam_model *) 1;
        expect("load_cancelled_mid", xsam_model_load(argv[1], bad, &m2), XSAM_ABORTED);
        CHECK(m2 == NULL && log.n > 2 && log.values[log.n - 1] >= 0.5f && log.values[log.n - 1] < 1.0f);

        /* budgets: room for the weights only, for weights + KV pool, then for everything */
        bad = xsam_model_default_params();
        bad.memory_budget = budget_weights;
        m2 = (xsam_model *) 1;
        expect("load_budget_kv", xsam_model_load(argv[1], bad, &m2), XSAM_ERR_OUT_OF_MEMORY);
        CHECK(m2 == NULL);
        bad.memory_budget = budget_kv_end;
        expect("load_budget_arena", xsam_model_load(argv[1], bad, &m2), XSAM_ERR_OUT_OF_MEMORY);
        CHECK(m2 == NULL);
        bad.memory_budget = budget_total;
        bad.progress_callback = log_progress;
        bad.progress_callback_user_data = &log;
        log.n = 0;
        log.cancel_at = 2.0f;
        CHECK(xsam_model_load(argv[1], bad, &m2) == XSAM_OK && m2 != NULL);
        CHECK(log.n >= 3 && log.values[log.n - 1] == 1.0f);
        CHECK(xsam_model_free(m2) == XSAM_OK);

        expect("text_small_buffer", xsam_result_json(res, small, sizeof small, &need), XSAM_BUFFER_TOO_SMALL);
        CHECK(need > sizeof small && small[3] == '\0');
        expect("text_null_result", xsam_result_text(NULL, small, sizeof small, &need), XSAM_ERR_NULL);
        expect("n_masks_null_out", xsam_result_n_masks(res, NULL), XSAM_ERR_NULL);
        expect("n_masks_wrong_handle", xsam_result_n_masks((const xsam_result *) session, &n), XSAM_ERR_INVALID_ARG);
        CHECK(xsam_result_n_masks(res, &n) == XSAM_OK);
        expect("mask_info_out_of_range", xsam_result_mask_info(res, n, &info), XSAM_ERR_INVALID_ARG);
        if (n > 0) {
            expect("bitmap_small_buffer", xsam_result_mask_bitmap(res, 0, bits, sizeof bits), XSAM_BUFFER_TOO_SMALL);
            expect("bitmap_null_buffer", xsam_result_mask_bitmap(res, 0, NULL, (size_t) W * H), XSAM_ERR_NULL);
        }

        expect("model_free_with_sessions", xsam_model_free(model), XSAM_ERR_INVALID_ARG);

        CHECK(xsam_result_free(res) == XSAM_OK);
        expect("result_free_twice", xsam_result_free(res), XSAM_ERR_INVALID_ARG);
        expect("result_free_null", xsam_result_free(NULL), XSAM_OK);
        CHECK(strcmp(xsam_last_error(), "") == 0);
    }

    CHECK(xsam_session_free(png_session) == XSAM_OK);
    CHECK(xsam_session_free(session) == XSAM_OK);
    expect("session_free_twice", xsam_session_free(session), XSAM_ERR_INVALID_ARG);
    CHECK(xsam_model_free(model) == XSAM_OK);
    expect("model_free_twice", xsam_model_free(model), XSAM_ERR_INVALID_ARG);

    if (failures) {
        fprintf(stderr, "%d unexpected return code(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
