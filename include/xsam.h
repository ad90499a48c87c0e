/*
 * xsam.h - C API of xsam, an inference runtime for X-SAM (segmentation multimodal LLM).
 *
 * Flow: load a model once (xsam_model_load), open a session on an image (xsam_session_from_image
 * or xsam_session_from_rgb8: the image side runs once, here), run any number of requests on that
 * session (xsam_session_run), read each result (text, masks, JSON) and free it.
 *
 *     xsam_model * model;
 *     if (xsam_model_load("models/tiny", xsam_model_default_params(), &model) != XSAM_OK) {
 *         fprintf(stderr, "%s\n", xsam_last_error());
 *     }
 *
 * Conventions
 *   - Every function that can fail returns an int32_t: XSAM_OK (0) on success, a positive value
 *     for a soft condition (XSAM_ABORTED, XSAM_BUFFER_TOO_SMALL), a negative XSAM_ERR_* on error.
 *     Outputs go through pointer arguments; on error, handle outputs are set to NULL.
 *   - xsam_last_error() returns the message of the last call on the calling thread: "" after
 *     XSAM_OK, the reason after an error or a soft condition. Every xsam function returning
 *     int32_t replaces it; xsam_version, xsam_last_error and the *_default_params do not.
 *   - Handles (xsam_model, xsam_session, xsam_result) are opaque and owned by the caller until
 *     passed to their *_free function. Passing NULL to a *_free function does nothing. Every other
 *     function reports a NULL, unknown, already freed or wrong-kind handle as an error
 *     (XSAM_ERR_NULL or XSAM_ERR_INVALID_ARG) without reading it; still, using a handle after
 *     freeing it is undefined behaviour (a later handle may reuse its address).
 *   - Strings are NUL-terminated UTF-8. Input buffers are only read during the call and are not
 *     retained. Output strings and masks are copied into caller-owned buffers.
 *   - Enumerations are passed as int32_t and validated (XSAM_ERR_INVALID_ARG on an unknown value).
 *   - No panic or exception crosses this API: an internal panic is reported as XSAM_ERR_PANIC.
 *
 * Thread safety
 *   - xsam_version, xsam_last_error and the *_default_params functions may be called from any
 *     thread at any time.
 *   - An xsam_model is immutable after loading: any number of threads may create sessions on one
 *     model concurrently, and sessions of one model may run concurrently on different threads.
 *     xsam_model_free must not race with any other use of that model.
 *   - An xsam_session is not thread-safe: calls on one session must not overlap (use one session
 *     per thread, or serialise). A session may be moved to, and used from, another thread.
 *   - An xsam_result is read-only: the xsam_result_* readers may be called on one result from
 *     several threads concurrently; xsam_result_free must not race with them.
 *
 * Build: `cargo build --release` produces target/release/libxsam.so and libxsam.a. Link against the
 * shared library with `cc prog.c -Iinclude -Ltarget/release -lxsam`, or statically with
 * `cc prog.c -Iinclude target/release/libxsam.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc`
 * (the system libraries Rust's standard library needs on Linux: `rustc --print native-static-libs`).
 */
#ifndef XSAM_H
#define XSAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef XSAM_SHARED
#    if defined(_WIN32) && !defined(__MINGW32__)
#        ifdef XSAM_BUILD
#            define XSAM_API __declspec(dllexport)
#        else
#            define XSAM_API __declspec(dllimport)
#        endif
#    else
#        define XSAM_API __attribute__((visibility("default")))
#    endif
#else
#    define XSAM_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------------------------
 * Return codes
 */

#define XSAM_OK                   0
#define XSAM_ABORTED              1  /* the abort / progress callback asked to stop             */
#define XSAM_BUFFER_TOO_SMALL     2  /* a caller buffer is too small; the required size is given */

#define XSAM_ERR_INVALID_ARG     -1  /* bad value: unknown enum, wrong size, stale handle, ...   */
#define XSAM_ERR_NULL            -2  /* a required pointer is NULL                              */
#define XSAM_ERR_IO              -3  /* a file or directory cannot be read                      */
#define XSAM_ERR_MODEL           -4  /* bad model files: config, weights, tokenizer            */
#define XSAM_ERR_INPUT           -5  /* bad input: undecodable image, bad request, prompt too long */
#define XSAM_ERR_BACKEND         -6  /* the device is unavailable or failed                     */
#define XSAM_ERR_OUT_OF_MEMORY   -7  /* memory budget or KV cache pool exhausted                */
#define XSAM_ERR_INTERNAL        -8  /* an internal consistency error (a bug)                    */
#define XSAM_ERR_PANIC           -9  /* an internal panic was caught (a bug)                     */

/* ---------------------------------------------------------------------------------------------
 * Enumerations (passed as int32_t)
 */

enum xsam_device {
    XSAM_DEVICE_CPU  = 0,
    XSAM_DEVICE_CUDA = 1,
};

enum xsam_task {
    XSAM_TASK_CONVERSATION = 0,  /* text: the question; no masks                                 */
    XSAM_TASK_SEMANTIC     = 1,  /* classes (+ stuff)                                             */
    XSAM_TASK_INSTANCE     = 2,  /* classes (+ stuff); threshold                                  */
    XSAM_TASK_PANOPTIC     = 3,  /* classes (things) + stuff; threshold                           */
    XSAM_TASK_REFERRING    = 4,  /* text: the referring expression; one mask                      */
    XSAM_TASK_REASONING    = 5,  /* text: the sentence; one mask                                  */
    XSAM_TASK_GCG          = 6,  /* grounded caption: one mask per <p>phrase</p> of the answer    */
    XSAM_TASK_INTERACTIVE  = 7,  /* one visual prompt; one mask                                   */
    XSAM_TASK_VGD          = 8,  /* visual prompts (optionally on vprompt_image); threshold       */
};

enum xsam_mask_kind {
    XSAM_MASK_THING = 0,
    XSAM_MASK_STUFF = 1,
};

/* ---------------------------------------------------------------------------------------------
 * Types
 */

struct xsam_model;    /* a loaded model                      */
struct xsam_session;  /* a model bound to one image          */
struct xsam_result;   /* what one request produced           */

typedef struct xsam_model   xsam_model;
typedef struct xsam_session xsam_session;
typedef struct xsam_result  xsam_result;

/* Called from the loading thread with the load's progress in [0, 1]: 0.0 first, then after the
   config, the tokenizer, each weight file mapped and validated and each model stage built (in
   proportion to its weight bytes); never decreasing; exactly 1.0 last, once the model (and the
   memory budget check) is done. Return false to cancel: xsam_model_load then stops at once and
   returns XSAM_ABORTED with no model. */
typedef bool (*xsam_progress_callback)(float progress, void * user_data);

/* Polled from the running thread between the stages of a request: before it starts, after the
   prompt is prepared, after the LLM prefill, before every decode step of a generated answer
   (after each generated token), before the segmentation head, before the mask decoder and before
   the post-processing. Return true to abort: the run stops at that point, xsam_session_run
   returns XSAM_ABORTED with no result and a message saying where it stopped. A poll costs one
   call; the longest gap between polls is one stage (e.g. the LLM prefill of a long prompt). */
typedef bool (*xsam_abort_callback)(void * user_data);

typedef struct xsam_model_params {
    int32_t  device;        /* enum xsam_device; default XSAM_DEVICE_CPU                      */
    int32_t  device_index;  /* CUDA ordinal (>= 0); default 0                                   */
    uint64_t memory_budget; /* bytes; 0 = no limit (default). What the model and ONE open session
                               on it hold: (1) the weights: the bytes of the *.safetensors files,
                               (2) the session's KV cache pool (allocated when the session opens,
                               sized for the shared prefix and one request under the sliding
                               window), (3) the session's executor arena (its activation buffer:
                               the planner's peak over every graph a session runs, each planned at
                               its largest shape). Not counted: the encoder states a session keeps
                               between requests, results, thread pools, the tokenizer. Each further
                               session adds its own (2) and (3). xsam_model_load fails with
                               XSAM_ERR_OUT_OF_MEMORY and a message giving each part and the first
                               that does not fit when (1) + (2) + (3) exceeds the budget (when (1)
                               alone does, before reading the weights).                          */
    xsam_progress_callback progress_callback;  /* may be NULL (default); see
                               xsam_progress_callback.                                            */
    void * progress_callback_user_data;
} xsam_model_params;

/* An 8-bit single-channel mask, row-major; nonzero pixels are "on". */
typedef struct xsam_mask_view {
    const uint8_t * data;
    size_t   size;          /* bytes at data; must equal width * height */
    uint32_t width;
    uint32_t height;
} xsam_mask_view;

typedef struct xsam_request_params {
    int32_t task;                   /* enum xsam_task; default XSAM_TASK_CONVERSATION            */
    const char * const * classes;   /* n_classes class names (things); may be NULL if 0          */
    size_t       n_classes;
    const char * const * stuff;     /* n_stuff stuff class names (panoptic; appended after the
                                       classes for semantic / instance); may be NULL if 0      */
    size_t       n_stuff;
    const char * text;              /* question / expression / sentence; NULL = none             */
    const xsam_mask_view * vprompts;/* n_vprompts visual prompts (interactive, vgd), each the
                                       size of the image it is drawn on; may be NULL if 0       */
    size_t       n_vprompts;
    const uint8_t * vprompt_image;  /* cross-image vgd: RGB8 row-major image the visual prompts
                                       are drawn on; NULL (and size 0) = the session's image     */
    size_t       vprompt_image_size;/* bytes; must equal width * height * 3                      */
    uint32_t     vprompt_image_width;
    uint32_t     vprompt_image_height;
    const char * answer;            /* forced mode with this answer; NULL = none                  */
    bool         forced;            /* forced mode with the default answer "Sure, <SEG>." when
                                       answer is NULL; default false (greedy generation)        */
    int32_t      max_new_tokens;    /* generation bound, > 0; default 512                         */
    double       threshold;         /* score threshold (instance, panoptic, vgd, interactive);
                                       finite; default 0.5                                       */
    xsam_abort_callback abort_callback; /* may be NULL (default); see xsam_abort_callback.      */
    void * abort_callback_user_data;
} xsam_request_params;

/* One result mask. label points into the result and stays valid until the result is freed. */
typedef struct xsam_mask_info {
    const char * label;       /* class name, expression or phrase (UTF-8)                      */
    int32_t  class_index;     /* index into classes then stuff (prompt order)                  */
    int32_t  kind;            /* enum xsam_mask_kind                                            */
    float    score;           /* unrounded (the JSON rounds to 6 decimals)                      */
    uint32_t segment_id;      /* 1-based; the panoptic segment id for panoptic                  */
    uint32_t width;           /* = the image width                                              */
    uint32_t height;          /* = the image height                                             */
    uint64_t area;            /* number of "on" pixels                                          */
} xsam_mask_info;

/* ---------------------------------------------------------------------------------------------
 * Version, errors, defaults (thread-safe, never fail)
 */

/* The library version, e.g. "0.1.0". A static string; do not free. */
XSAM_API const char * xsam_version(void);

/* The message of the last int32_t-returning xsam call on this thread ("" if it returned XSAM_OK).
   Owned by the library; valid until the next such call on this thread. Never NULL. */
XSAM_API const char * xsam_last_error(void);

XSAM_API xsam_model_params   xsam_model_default_params(void);
XSAM_API xsam_request_params xsam_request_default_params(void);

/* ---------------------------------------------------------------------------------------------
 * Model
 */

/* Loads the model directory `path` (config.json, *.safetensors, tokenizer.json, as written by
   `xsam convert` or `xsam init`). On XSAM_OK, *out_model is a new handle owned by the caller
   (free with xsam_model_free); otherwise *out_model is NULL. Errors: XSAM_ERR_NULL (path or
   out_model NULL), XSAM_ERR_INVALID_ARG (bad device), XSAM_ERR_IO (no such directory),
   XSAM_ERR_MODEL (bad files), XSAM_ERR_BACKEND (device unavailable: the CUDA pipeline is not
   available yet), XSAM_ERR_OUT_OF_MEMORY (memory_budget: see xsam_model_params). XSAM_ABORTED: the
   progress callback cancelled (no model). Thread-safe (loads may run concurrently). */
XSAM_API int32_t xsam_model_load(const char * path, xsam_model_params params, xsam_model ** out_model);

/* Frees a model. NULL: no-op. Refused with XSAM_ERR_INVALID_ARG (nothing freed) while sessions of
   this model are still open: free them first. Must not race with other uses of the model. */
XSAM_API int32_t xsam_model_free(xsam_model * model);

/* ---------------------------------------------------------------------------------------------
 * Session: a model bound to one image. Creating it runs the image side (the encoders and the
 * shared LLM prefix); every request on it then costs only its own prompt. The session refers to
 * its model, which must not be freed before the session (xsam_model_free refuses).
 */

/* A session on an encoded image (PNG, JPEG or WebP) of `size` bytes. On XSAM_OK, *out_session is a
   new handle owned by the caller (free with xsam_session_free); otherwise NULL. Errors:
   XSAM_ERR_NULL, XSAM_ERR_INVALID_ARG (stale model handle, size 0), XSAM_ERR_INPUT (undecodable
   image). Thread-safe with respect to the model (see Thread safety). */
XSAM_API int32_t xsam_session_from_image(xsam_model * model, const uint8_t * data, size_t size,
                                         xsam_session ** out_session);

/* A session on raw RGB8 pixels, row-major, no padding: `size` must equal width * height * 3
   (else XSAM_ERR_INVALID_ARG). Otherwise as xsam_session_from_image. */
XSAM_API int32_t xsam_session_from_rgb8(xsam_model * model, const uint8_t * pixels, size_t size,
                                        uint32_t width, uint32_t height, xsam_session ** out_session);

/* Frees a session. NULL: no-op. Must not race with other calls on the session. */
XSAM_API int32_t xsam_session_free(xsam_session * session);

/* The session's image size. Not thread-safe with respect to the session. */
XSAM_API int32_t xsam_session_image_size(const xsam_session * session, uint32_t * width, uint32_t * height);

/* Runs one request on the session's image. On XSAM_OK, *out_result is a new handle owned by the
   caller (free with xsam_result_free); otherwise NULL. Errors: XSAM_ERR_NULL (session, out_result,
   a class string, a mask's data with n > 0), XSAM_ERR_INVALID_ARG (bad task value, wrong mask or
   image size, max_new_tokens <= 0, non-finite threshold, stale handle), XSAM_ERR_INPUT (inputs the
   task does not take, missing text, prompt too long for the context, non-UTF-8 strings).
   XSAM_ABORTED: the abort callback asked to stop (see xsam_abort_callback); no result is made and
   the request leaves nothing behind in the session. The session stays usable after any return.
   Not thread-safe with respect to the session. */
XSAM_API int32_t xsam_session_run(xsam_session * session, xsam_request_params params,
                                  xsam_result ** out_result);

/* ---------------------------------------------------------------------------------------------
 * Result: read-only after creation. Independent of its session and model (it may outlive both).
 */

/* Frees a result and the label strings it owns. NULL: no-op. A result freed twice is undefined
   behaviour; this implementation reports it as XSAM_ERR_INVALID_ARG when the address has not
   been reused. */
XSAM_API int32_t xsam_result_free(xsam_result * result);

/* The answer text (special tokens removed). Copies it with a terminating NUL into buf when
   buf_size is large enough; *required (if not NULL) receives the size needed including the NUL.
   If buf_size is too small, XSAM_BUFFER_TOO_SMALL is returned and buf (if not NULL and buf_size >
   0) receives a truncated NUL-terminated prefix. buf may be NULL with buf_size 0 to query the
   size. */
XSAM_API int32_t xsam_result_text(const xsam_result * result, char * buf, size_t buf_size, size_t * required);

/* The result JSON document (task, text, token_ids, image, masks with COCO RLE, timings_ms), as
   written by `xsam run --json`. Same buffer convention as xsam_result_text. */
XSAM_API int32_t xsam_result_json(const xsam_result * result, char * buf, size_t buf_size, size_t * required);

/* The size of the image the result refers to (every mask has this size). */
XSAM_API int32_t xsam_result_image_size(const xsam_result * result, uint32_t * width, uint32_t * height);

/* The number of masks (0 for conversation, or when the answer holds no usable <SEG>). */
XSAM_API int32_t xsam_result_n_masks(const xsam_result * result, size_t * n_masks);

/* The description of mask `index` (0-based, < n_masks, else XSAM_ERR_INVALID_ARG). */
XSAM_API int32_t xsam_result_mask_info(const xsam_result * result, size_t index, xsam_mask_info * info);

/* Mask `index` as a bitmap: width * height bytes, row-major, 1 = on, 0 = off, written to buf.
   buf_size < width * height: XSAM_BUFFER_TOO_SMALL and nothing is written. */
XSAM_API int32_t xsam_result_mask_bitmap(const xsam_result * result, size_t index, uint8_t * buf, size_t buf_size);

/* Mask `index` as COCO uncompressed RLE: column-major runs alternating off/on, starting with off
   (a mask whose first pixel is on starts with a 0). *n_counts receives the number of runs; when
   capacity is smaller, XSAM_BUFFER_TOO_SMALL is returned and nothing is written (counts may be
   NULL with capacity 0 to query). */
XSAM_API int32_t xsam_result_mask_rle(const xsam_result * result, size_t index, uint64_t * counts,
                                      size_t capacity, size_t * n_counts);

#ifdef __cplusplus
}
#endif

#endif /* XSAM_H */
