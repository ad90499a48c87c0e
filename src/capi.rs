//! The C ABI (`include/xsam.h`): opaque handles over [`Model`], [`Session`] and [`Output`],
//! parameter structs passed by value, `int32_t` return codes (0 ok, > 0 soft condition, < 0
//! error) and a thread-local message behind [`xsam_last_error`].
//!
//! Every entry point runs inside [`guard`]: a Rust panic is caught there and becomes
//! `XSAM_ERR_PANIC` with a message; it never unwinds into C.
//!
//! Handles are `Box` pointers, and every live one is also recorded in a global registry (address
//! → kind). Each call looks its handle up there before dereferencing it, so a NULL, foreign,
//! already-freed or wrong-kind handle is reported as `XSAM_ERR_INVALID_ARG` instead of being
//! read (a freed address that a later handle of the same kind reuses is indistinguishable from
//! that new handle; the header documents use after free as undefined).
//!
//! The header is kept in sync with the `pub extern "C" fn xsam_*` functions of this file by
//! `tests/c_api.rs`.

#![allow(clippy::missing_safety_doc, non_camel_case_types)]

use crate::image::{decode_image, GreyImage, RgbImage};
use crate::task::postprocess::{MaskKind, MaskResult};
use crate::task::rle;
use crate::task::templates::Task;
use crate::{Device, Error, Model, Output, Request, RunHooks, Session};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

// ---------------------------------------------------------------------------------------------
// Return codes (mirrored in include/xsam.h).

pub const XSAM_OK: i32 = 0;
/// The abort or progress callback asked to stop.
pub const XSAM_ABORTED: i32 = 1;
/// A caller buffer is too small; the required size was reported.
pub const XSAM_BUFFER_TOO_SMALL: i32 = 2;

pub const XSAM_ERR_INVALID_ARG: i32 = -1;
pub const XSAM_ERR_NULL: i32 = -2;
pub const XSAM_ERR_IO: i32 = -3;
pub const XSAM_ERR_MODEL: i32 = -4;
pub const XSAM_ERR_INPUT: i32 = -5;
pub const XSAM_ERR_BACKEND: i32 = -6;
pub const XSAM_ERR_OUT_OF_MEMORY: i32 = -7;
pub const XSAM_ERR_INTERNAL: i32 = -8;
pub const XSAM_ERR_PANIC: i32 = -9;

pub const XSAM_DEVICE_CPU: i32 = 0;
pub const XSAM_DEVICE_CUDA: i32 = 1;

pub const XSAM_MASK_THING: i32 = 0;
pub const XSAM_MASK_STUFF: i32 = 1;

/// Tasks in `xsam_task` order (XSAM_TASK_CONVERSATION = 0 ... XSAM_TASK_VGD = 8).
const TASKS: [Task; 9] = [
    Task::Conversation,
    Task::Semantic,
    Task::Instance,
    Task::Panoptic,
    Task::Referring,
    Task::Reasoning,
    Task::Gcg,
    Task::Interactive,
    Task::Vgd,
];

// The thread-safety statements of the header rest on these.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Model>();
    send::<Session<'static>>();
};

// ---------------------------------------------------------------------------------------------
// Public C types.

/// Called during `xsam_model_load` with a progress in [0, 1]; return false to cancel.
pub type XsamProgressCallback =
    Option<unsafe extern "C" fn(progress: f32, user_data: *mut c_void) -> bool>;
/// Polled during `xsam_session_run`; return true to abort.
pub type XsamAbortCallback = Option<unsafe extern "C" fn(user_data: *mut c_void) -> bool>;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct xsam_model_params {
    pub device: i32,
    pub device_index: i32,
    pub memory_budget: u64,
    pub progress_callback: XsamProgressCallback,
    pub progress_callback_user_data: *mut c_void,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct xsam_mask_view {
    pub data: *const u8,
    pub size: usize,
    pub width: u32,
    pub height: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct xsam_request_params {
    pub task: i32,
    pub classes: *const *const c_char,
    pub n_classes: usize,
    pub stuff: *const *const c_char,
    pub n_stuff: usize,
    pub text: *const c_char,
    pub vprompts: *const xsam_mask_view,
    pub n_vprompts: usize,
    pub vprompt_image: *const u8,
    pub vprompt_image_size: usize,
    pub vprompt_image_width: u32,
    pub vprompt_image_height: u32,
    pub answer: *const c_char,
    pub forced: bool,
    pub max_new_tokens: i32,
    pub threshold: f64,
    pub abort_callback: XsamAbortCallback,
    pub abort_callback_user_data: *mut c_void,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct xsam_mask_info {
    pub label: *const c_char,
    pub class_index: i32,
    pub kind: i32,
    pub score: f32,
    pub segment_id: u32,
    pub width: u32,
    pub height: u32,
    pub area: u64,
}

/// Opaque model handle.
pub struct xsam_model {
    model: Model,
    /// Live sessions on this model (freeing the model is refused while any).
    sessions: AtomicUsize,
}

/// Opaque session handle.
pub struct xsam_session {
    /// Borrows `*model`; dropped before the model, which cannot be freed while this lives.
    session: Session<'static>,
    model: *const xsam_model,
}

/// Opaque result handle.
pub struct xsam_result {
    output: Output,
    text: CString,
    json: CString,
    labels: Vec<CString>,
}

// ---------------------------------------------------------------------------------------------
// Errors, panics, handle registry.

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error code and its message.
struct Fail(i32, String);

type CResult<T> = std::result::Result<T, Fail>;

fn fail<T>(code: i32, msg: impl Into<String>) -> CResult<T> {
    Err(Fail(code, msg.into()))
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Io { .. } => XSAM_ERR_IO,
            Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::Weights { .. }
            | Error::Config { .. }
            | Error::Tokenizer(_) => XSAM_ERR_MODEL,
            Error::Input(_) => XSAM_ERR_INPUT,
            Error::Backend { .. } => XSAM_ERR_BACKEND,
            Error::OutOfMemory(_) => XSAM_ERR_OUT_OF_MEMORY,
            Error::Aborted(_) => XSAM_ABORTED,
            Error::Shape { .. } | Error::DType { .. } | Error::Graph(_) => XSAM_ERR_INTERNAL,
        };
        Fail(code, e.to_string())
    }
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs `f` with the panic boundary: clears the thread's message, maps `Err` and panics to
/// codes and messages.
fn guard(name: &str, f: impl FnOnce() -> CResult<i32>) -> i32 {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(Fail(code, msg))) => {
            set_last_error(&format!("{name}: {msg}"));
            code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("{name}: internal panic: {what}"));
            XSAM_ERR_PANIC
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Model,
    Session,
    Result,
}

static HANDLES: Mutex<BTreeMap<usize, Kind>> = Mutex::new(BTreeMap::new());

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<usize, Kind>> {
    HANDLES.lock().unwrap_or_else(|e| e.into_inner())
}

fn register<T>(b: Box<T>, kind: Kind) -> *mut T {
    let p = Box::into_raw(b);
    registry().insert(p as usize, kind);
    p
}

fn check_handle<T>(p: *const T, kind: Kind, what: &str) -> CResult<()> {
    if p.is_null() {
        return fail(XSAM_ERR_NULL, format!("{what} is NULL"));
    }
    match registry().get(&(p as usize)) {
        Some(k) if *k == kind => Ok(()),
        Some(k) => fail(
            XSAM_ERR_INVALID_ARG,
            format!("{what} is a {k:?} handle, not a {kind:?} handle"),
        ),
        None => fail(
            XSAM_ERR_INVALID_ARG,
            format!("{what} is not a live {kind:?} handle (already freed, or not from xsam)"),
        ),
    }
}

/// Removes a handle from the registry, failing unless it was live with this kind.
fn unregister<T>(p: *const T, kind: Kind, what: &str) -> CResult<()> {
    let mut reg = registry();
    match reg.get(&(p as usize)) {
        Some(k) if *k == kind => {
            reg.remove(&(p as usize));
            Ok(())
        }
        _ => {
            drop(reg);
            check_handle(p, kind, what)
        }
    }
}

fn out_ptr<T>(p: *mut T, what: &str) -> CResult<()> {
    if p.is_null() {
        fail(XSAM_ERR_NULL, format!("{what} is NULL"))
    } else {
        Ok(())
    }
}

/// `len` bytes at `p`; `p` may be NULL only when `len` is 0.
unsafe fn bytes<'a>(p: *const u8, len: usize, what: &str) -> CResult<&'a [u8]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(XSAM_ERR_NULL, format!("{what} is NULL"));
    }
    Ok(std::slice::from_raw_parts(p, len))
}

unsafe fn string(p: *const c_char, what: &str) -> CResult<String> {
    if p.is_null() {
        return fail(XSAM_ERR_NULL, format!("{what} is NULL"));
    }
    CStr::from_ptr(p)
        .to_str()
        .map(str::to_owned)
        .or_else(|_| fail(XSAM_ERR_INPUT, format!("{what} is not valid UTF-8")))
}

unsafe fn opt_string(p: *const c_char, what: &str) -> CResult<Option<String>> {
    if p.is_null() {
        Ok(None)
    } else {
        string(p, what).map(Some)
    }
}

unsafe fn strings(p: *const *const c_char, n: usize, what: &str) -> CResult<Vec<String>> {
    if n == 0 {
        return Ok(vec![]);
    }
    if p.is_null() {
        return fail(
            XSAM_ERR_NULL,
            format!("{what} is NULL but its count is {n}"),
        );
    }
    std::slice::from_raw_parts(p, n)
        .iter()
        .enumerate()
        .map(|(i, &s)| string(s, &format!("{what}[{i}]")))
        .collect()
}

/// Copies `s` and a NUL into `buf` (truncating when `buf_size` is short); the required size
/// (bytes including the NUL) goes to `*required` when not NULL.
unsafe fn copy_str(
    name: &str,
    s: &CStr,
    buf: *mut c_char,
    buf_size: usize,
    required: *mut usize,
) -> CResult<i32> {
    let b = s.to_bytes_with_nul();
    if !required.is_null() {
        *required = b.len();
    }
    if buf_size < b.len() {
        set_last_error(&format!(
            "{name}: the buffer holds {buf_size} bytes, {} are needed (with the NUL)",
            b.len()
        ));
    }
    if buf_size == 0 {
        return Ok(XSAM_BUFFER_TOO_SMALL);
    }
    out_ptr(buf, "buf")?;
    let n = b.len().min(buf_size);
    std::ptr::copy_nonoverlapping(b.as_ptr() as *const c_char, buf, n);
    if n < b.len() {
        *buf.add(n - 1) = 0;
        Ok(XSAM_BUFFER_TOO_SMALL)
    } else {
        Ok(XSAM_OK)
    }
}

// ---------------------------------------------------------------------------------------------
// Version, errors, defaults.

static VERSION: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(s) => s,
        Err(_) => c"unknown",
    };

#[no_mangle]
pub extern "C" fn xsam_version() -> *const c_char {
    VERSION.as_ptr()
}

#[no_mangle]
pub extern "C" fn xsam_last_error() -> *const c_char {
    // A pointer into the thread-local CString: valid until the next xsam call on this thread
    // replaces it (that call drops the old CString).
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[no_mangle]
pub extern "C" fn xsam_model_default_params() -> xsam_model_params {
    xsam_model_params {
        device: XSAM_DEVICE_CPU,
        device_index: 0,
        memory_budget: 0,
        progress_callback: None,
        progress_callback_user_data: std::ptr::null_mut(),
    }
}

#[no_mangle]
pub extern "C" fn xsam_request_default_params() -> xsam_request_params {
    let d = Request::default();
    xsam_request_params {
        task: 0,
        classes: std::ptr::null(),
        n_classes: 0,
        stuff: std::ptr::null(),
        n_stuff: 0,
        text: std::ptr::null(),
        vprompts: std::ptr::null(),
        n_vprompts: 0,
        vprompt_image: std::ptr::null(),
        vprompt_image_size: 0,
        vprompt_image_width: 0,
        vprompt_image_height: 0,
        answer: std::ptr::null(),
        forced: false,
        max_new_tokens: d.max_new_tokens as i32,
        threshold: d.threshold,
        abort_callback: None,
        abort_callback_user_data: std::ptr::null_mut(),
    }
}

// ---------------------------------------------------------------------------------------------
// Model.

/// Bytes of the `*.safetensors` files in `dir` (what the mmapped weights occupy).
fn weights_bytes(dir: &Path) -> CResult<u64> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Fail(XSAM_ERR_IO, format!("cannot read {}: {e}", dir.display())))?;
    let mut total = 0u64;
    for e in rd.flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    Ok(total)
}

#[no_mangle]
pub unsafe extern "C" fn xsam_model_load(
    path: *const c_char,
    params: xsam_model_params,
    out_model: *mut *mut xsam_model,
) -> i32 {
    guard("xsam_model_load", || {
        out_ptr(out_model, "out_model")?;
        *out_model = std::ptr::null_mut();
        let path = string(path, "path")?;
        let device = match params.device {
            XSAM_DEVICE_CPU => Device::Cpu,
            XSAM_DEVICE_CUDA => {
                let i = usize::try_from(params.device_index).or_else(|_| {
                    fail(
                        XSAM_ERR_INVALID_ARG,
                        format!("device_index {} is negative", params.device_index),
                    )
                })?;
                Device::Cuda(i)
            }
            d => {
                return fail(
                    XSAM_ERR_INVALID_ARG,
                    format!("invalid device value {d} (expected XSAM_DEVICE_CPU = 0 or XSAM_DEVICE_CUDA = 1)"),
                )
            }
        };
        let progress = |p: f32| -> bool {
            match params.progress_callback {
                Some(cb) => cb(p, params.progress_callback_user_data),
                None => true,
            }
        };
        let dir = Path::new(&path);
        if !dir.is_dir() {
            return fail(
                XSAM_ERR_IO,
                format!("model directory {path} does not exist"),
            );
        }
        let budget = params.memory_budget;
        // The weight files alone, before reading anything.
        if budget > 0 {
            let need = weights_bytes(dir)?;
            if need > budget {
                return fail(
                    XSAM_ERR_OUT_OF_MEMORY,
                    format!(
                        "the weights take {need} bytes, more than the memory budget of {budget} bytes"
                    ),
                );
            }
        }
        // The load reports up to 1.0; the caller sees 1.0 only once the budget check passed.
        let model = Model::load_with_progress(dir, device, &mut |p| p >= 1.0 || progress(p))?;
        if budget > 0 {
            model.memory_plan()?.check(budget)?;
        }
        if !progress(1.0) {
            return Err(Error::Aborted(
                "the model load was cancelled by the progress callback at 100%".into(),
            )
            .into());
        }
        let h = Box::new(xsam_model {
            model,
            sessions: AtomicUsize::new(0),
        });
        *out_model = register(h, Kind::Model);
        Ok(XSAM_OK)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_model_free(model: *mut xsam_model) -> i32 {
    guard("xsam_model_free", || {
        if model.is_null() {
            return Ok(XSAM_OK);
        }
        let mut reg = registry();
        if reg.get(&(model as usize)) != Some(&Kind::Model) {
            drop(reg);
            check_handle(model, Kind::Model, "model")?;
            return fail(
                XSAM_ERR_INVALID_ARG,
                "the model handle changed during the call",
            );
        }
        let n = (*model).sessions.load(Ordering::SeqCst);
        if n > 0 {
            return fail(
                XSAM_ERR_INVALID_ARG,
                format!("the model still has {n} open session(s); free them first"),
            );
        }
        reg.remove(&(model as usize));
        drop(reg);
        drop(Box::from_raw(model));
        Ok(XSAM_OK)
    })
}

// ---------------------------------------------------------------------------------------------
// Session.

unsafe fn open_session(
    model: *mut xsam_model,
    image: impl FnOnce() -> CResult<RgbImage>,
    out_session: *mut *mut xsam_session,
) -> CResult<i32> {
    out_ptr(out_session, "out_session")?;
    *out_session = std::ptr::null_mut();
    check_handle(model, Kind::Model, "model")?;
    let image = image()?;
    let m: &'static xsam_model = &*model;
    // Count first so a concurrent xsam_model_free refuses while the session is being built.
    m.sessions.fetch_add(1, Ordering::SeqCst);
    match m.model.session(&image) {
        Ok(session) => {
            let h = Box::new(xsam_session { session, model });
            *out_session = register(h, Kind::Session);
            Ok(XSAM_OK)
        }
        Err(e) => {
            m.sessions.fetch_sub(1, Ordering::SeqCst);
            Err(e.into())
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn xsam_session_from_image(
    model: *mut xsam_model,
    data: *const u8,
    size: usize,
    out_session: *mut *mut xsam_session,
) -> i32 {
    guard("xsam_session_from_image", || {
        open_session(
            model,
            || {
                if size == 0 {
                    return fail(XSAM_ERR_INVALID_ARG, "size is 0 (no image bytes)");
                }
                Ok(decode_image(bytes(data, size, "data")?)?)
            },
            out_session,
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_session_from_rgb8(
    model: *mut xsam_model,
    pixels: *const u8,
    size: usize,
    width: u32,
    height: u32,
    out_session: *mut *mut xsam_session,
) -> i32 {
    guard("xsam_session_from_rgb8", || {
        open_session(
            model,
            || rgb8(pixels, size, width, height, "pixels"),
            out_session,
        )
    })
}

unsafe fn rgb8(p: *const u8, size: usize, w: u32, h: u32, what: &str) -> CResult<RgbImage> {
    if w == 0 || h == 0 {
        return fail(
            XSAM_ERR_INVALID_ARG,
            format!("{what}: width and height must be positive, got {w}x{h}"),
        );
    }
    let need = (w as u64) * (h as u64) * 3;
    if size as u64 != need {
        return fail(
            XSAM_ERR_INVALID_ARG,
            format!("{what}: size is {size} bytes but a {w}x{h} RGB8 image has {need}"),
        );
    }
    Ok(RgbImage::new(
        w as usize,
        h as usize,
        bytes(p, size, what)?.to_vec(),
    )?)
}

#[no_mangle]
pub unsafe extern "C" fn xsam_session_free(session: *mut xsam_session) -> i32 {
    guard("xsam_session_free", || {
        if session.is_null() {
            return Ok(XSAM_OK);
        }
        unregister(session, Kind::Session, "session")?;
        let s = Box::from_raw(session);
        let model = s.model;
        drop(s);
        (*model).sessions.fetch_sub(1, Ordering::SeqCst);
        Ok(XSAM_OK)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_session_image_size(
    session: *const xsam_session,
    width: *mut u32,
    height: *mut u32,
) -> i32 {
    guard("xsam_session_image_size", || {
        check_handle(session, Kind::Session, "session")?;
        out_ptr(width, "width")?;
        out_ptr(height, "height")?;
        let (h, w) = (*session).session.image_size();
        *width = w as u32;
        *height = h as u32;
        Ok(XSAM_OK)
    })
}

unsafe fn request(p: &xsam_request_params) -> CResult<Request> {
    let task = usize::try_from(p.task)
        .ok()
        .and_then(|i| TASKS.get(i).copied())
        .ok_or_else(|| {
            Fail(
                XSAM_ERR_INVALID_ARG,
                format!(
                    "invalid task value {} (expected 0..{})",
                    p.task,
                    TASKS.len() - 1
                ),
            )
        })?;
    if p.max_new_tokens <= 0 {
        return fail(
            XSAM_ERR_INVALID_ARG,
            format!("max_new_tokens must be positive, got {}", p.max_new_tokens),
        );
    }
    if !p.threshold.is_finite() {
        return fail(
            XSAM_ERR_INVALID_ARG,
            format!("threshold {} is not finite", p.threshold),
        );
    }
    let mut vprompts = vec![];
    if p.n_vprompts > 0 {
        if p.vprompts.is_null() {
            return fail(
                XSAM_ERR_NULL,
                format!("vprompts is NULL but n_vprompts is {}", p.n_vprompts),
            );
        }
        for (i, v) in std::slice::from_raw_parts(p.vprompts, p.n_vprompts)
            .iter()
            .enumerate()
        {
            let what = format!("vprompts[{i}]");
            if v.width == 0 || v.height == 0 {
                return fail(
                    XSAM_ERR_INVALID_ARG,
                    format!(
                        "{what}: width and height must be positive, got {}x{}",
                        v.width, v.height
                    ),
                );
            }
            let need = v.width as u64 * v.height as u64;
            if v.size as u64 != need {
                return fail(
                    XSAM_ERR_INVALID_ARG,
                    format!(
                        "{what}: size is {} bytes but a {}x{} mask has {need}",
                        v.size, v.width, v.height
                    ),
                );
            }
            let data = bytes(v.data, v.size, &format!("{what}.data"))?.to_vec();
            vprompts.push(GreyImage::new(v.width as usize, v.height as usize, data)?);
        }
    }
    let vprompt_image = if p.vprompt_image.is_null() && p.vprompt_image_size == 0 {
        None
    } else {
        Some(rgb8(
            p.vprompt_image,
            p.vprompt_image_size,
            p.vprompt_image_width,
            p.vprompt_image_height,
            "vprompt_image",
        )?)
    };
    Ok(Request {
        task,
        classes: strings(p.classes, p.n_classes, "classes")?,
        stuff: strings(p.stuff, p.n_stuff, "stuff")?,
        text: opt_string(p.text, "text")?,
        vprompts,
        vprompt_image,
        answer: opt_string(p.answer, "answer")?,
        forced: p.forced,
        max_new_tokens: p.max_new_tokens as usize,
        threshold: p.threshold,
        dump: false,
    })
}

fn make_result(output: Output) -> CResult<xsam_result> {
    let json = output.result.to_json_string()?;
    let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
    Ok(xsam_result {
        text: c(&output.result.text),
        json: c(&json),
        labels: output.masks.iter().map(|m| c(&m.label)).collect(),
        output,
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_session_run(
    session: *mut xsam_session,
    params: xsam_request_params,
    out_result: *mut *mut xsam_result,
) -> i32 {
    guard("xsam_session_run", || {
        out_ptr(out_result, "out_result")?;
        *out_result = std::ptr::null_mut();
        check_handle(session, Kind::Session, "session")?;
        let req = request(&params)?;
        let mut abort = || match params.abort_callback {
            Some(cb) => cb(params.abort_callback_user_data),
            None => false,
        };
        let mut hooks = RunHooks {
            on_token: None,
            should_abort: Some(&mut abort),
        };
        // Error::Aborted becomes XSAM_ABORTED with its message; no result is made.
        let output = (*session).session.run_with_hooks(&req, &mut hooks)?;
        *out_result = register(Box::new(make_result(output)?), Kind::Result);
        Ok(XSAM_OK)
    })
}

// ---------------------------------------------------------------------------------------------
// Result.

#[no_mangle]
pub unsafe extern "C" fn xsam_result_free(result: *mut xsam_result) -> i32 {
    guard("xsam_result_free", || {
        if result.is_null() {
            return Ok(XSAM_OK);
        }
        unregister(result, Kind::Result, "result")?;
        drop(Box::from_raw(result));
        Ok(XSAM_OK)
    })
}

unsafe fn live_result<'a>(r: *const xsam_result) -> CResult<&'a xsam_result> {
    check_handle(r, Kind::Result, "result")?;
    Ok(&*r)
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_text(
    result: *const xsam_result,
    buf: *mut c_char,
    buf_size: usize,
    required: *mut usize,
) -> i32 {
    guard("xsam_result_text", || {
        let r = live_result(result)?;
        copy_str("xsam_result_text", &r.text, buf, buf_size, required)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_json(
    result: *const xsam_result,
    buf: *mut c_char,
    buf_size: usize,
    required: *mut usize,
) -> i32 {
    guard("xsam_result_json", || {
        let r = live_result(result)?;
        copy_str("xsam_result_json", &r.json, buf, buf_size, required)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_image_size(
    result: *const xsam_result,
    width: *mut u32,
    height: *mut u32,
) -> i32 {
    guard("xsam_result_image_size", || {
        let r = live_result(result)?;
        out_ptr(width, "width")?;
        out_ptr(height, "height")?;
        *width = r.output.result.image.width as u32;
        *height = r.output.result.image.height as u32;
        Ok(XSAM_OK)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_n_masks(result: *const xsam_result, n: *mut usize) -> i32 {
    guard("xsam_result_n_masks", || {
        let r = live_result(result)?;
        out_ptr(n, "n")?;
        *n = r.output.masks.len();
        Ok(XSAM_OK)
    })
}

fn mask_at(r: &xsam_result, index: usize) -> CResult<&MaskResult> {
    r.output.masks.get(index).ok_or_else(|| {
        Fail(
            XSAM_ERR_INVALID_ARG,
            format!(
                "mask index {index} out of range (the result has {} masks)",
                r.output.masks.len()
            ),
        )
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_mask_info(
    result: *const xsam_result,
    index: usize,
    info: *mut xsam_mask_info,
) -> i32 {
    guard("xsam_result_mask_info", || {
        let r = live_result(result)?;
        out_ptr(info, "info")?;
        let m = mask_at(r, index)?;
        *info = xsam_mask_info {
            label: r.labels[index].as_ptr(),
            class_index: m.class_index as i32,
            kind: match m.kind {
                MaskKind::Thing => XSAM_MASK_THING,
                MaskKind::Stuff => XSAM_MASK_STUFF,
            },
            score: m.score,
            segment_id: m.segment_id,
            width: m.mask.width() as u32,
            height: m.mask.height() as u32,
            area: m.mask.count_ones() as u64,
        };
        Ok(XSAM_OK)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_mask_bitmap(
    result: *const xsam_result,
    index: usize,
    buf: *mut u8,
    buf_size: usize,
) -> i32 {
    guard("xsam_result_mask_bitmap", || {
        let r = live_result(result)?;
        let m = &mask_at(r, index)?.mask;
        let need = m.width() * m.height();
        if buf_size < need {
            set_last_error(&format!(
                "xsam_result_mask_bitmap: the buffer holds {buf_size} bytes, the {}x{} mask needs {need}",
                m.width(),
                m.height()
            ));
            return Ok(XSAM_BUFFER_TOO_SMALL);
        }
        if need == 0 {
            return Ok(XSAM_OK);
        }
        out_ptr(buf, "buf")?;
        let out = std::slice::from_raw_parts_mut(buf, need);
        for (i, o) in out.iter_mut().enumerate() {
            *o = m.get_index(i) as u8;
        }
        Ok(XSAM_OK)
    })
}

#[no_mangle]
pub unsafe extern "C" fn xsam_result_mask_rle(
    result: *const xsam_result,
    index: usize,
    counts: *mut u64,
    capacity: usize,
    n_counts: *mut usize,
) -> i32 {
    guard("xsam_result_mask_rle", || {
        let r = live_result(result)?;
        out_ptr(n_counts, "n_counts")?;
        let rle = rle::encode(&mask_at(r, index)?.mask);
        *n_counts = rle.counts.len();
        if capacity < rle.counts.len() {
            set_last_error(&format!(
                "xsam_result_mask_rle: the buffer holds {capacity} counts, the RLE has {}",
                rle.counts.len()
            ));
            return Ok(XSAM_BUFFER_TOO_SMALL);
        }
        out_ptr(counts, "counts")?;
        std::ptr::copy_nonoverlapping(rle.counts.as_ptr(), counts, rle.counts.len());
        Ok(XSAM_OK)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_an_error_code_and_a_message() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let code = guard("xsam_test", || panic!("boom {}", 42));
        std::panic::set_hook(prev);
        assert_eq!(code, XSAM_ERR_PANIC);
        let msg = unsafe { CStr::from_ptr(xsam_last_error()) }
            .to_str()
            .unwrap();
        assert_eq!(msg, "xsam_test: internal panic: boom 42");
        // the next call clears it
        assert_eq!(guard("xsam_test", || Ok(XSAM_OK)), XSAM_OK);
        assert_eq!(unsafe { CStr::from_ptr(xsam_last_error()) }.to_bytes(), b"");
    }

    #[test]
    fn copy_str_reports_the_required_size_and_truncates() {
        let s = c"hello";
        let mut need = 0usize;
        let mut buf = [1 as c_char; 4];
        let code = unsafe { copy_str("t", s, buf.as_mut_ptr(), buf.len(), &mut need) }
            .ok()
            .unwrap();
        assert_eq!((code, need), (XSAM_BUFFER_TOO_SMALL, 6));
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_bytes(), b"hel");
        let mut buf = [1 as c_char; 6];
        let code = unsafe { copy_str("t", s, buf.as_mut_ptr(), buf.len(), std::ptr::null_mut()) }
            .ok()
            .unwrap();
        assert_eq!(code, XSAM_OK);
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_bytes(), b"hello");
        let code = unsafe { copy_str("t", s, std::ptr::null_mut(), 0, &mut need) }
            .ok()
            .unwrap();
        assert_eq!((code, need), (XSAM_BUFFER_TOO_SMALL, 6));
    }
}
