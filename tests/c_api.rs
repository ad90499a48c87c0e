//! The C ABI from C: `tests/c/test_capi.c` (compiled with the system C compiler, `cc`) and
//! `tests/c/test_header.cpp` (C++ under `c++ -Wall -Wextra -Werror -pedantic`), linked
//! against the cdylib cargo built for this test run; the C program is also linked statically
//! against the staticlib (`libxsam.a` plus the system libraries Rust's std needs). The C
//! program's results are checked against the Rust API on the same inputs, and its soft
//! conditions and error cases against the expected codes and messages.
//!
//! With `XSAM_VALGRIND=1` (set by `.ci/run` when valgrind exists) the C program also runs under
//! `valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite`: invalid
//! accesses and definitely lost blocks fail the test. "Still reachable" blocks are not errors:
//! rayon's global thread pool, the handle registry and thread-locals live until process exit by
//! design.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use xsam::image::RgbImage;
use xsam::task::result::ResultJson;
use xsam::task::rle;
use xsam::task::templates::Task;
use xsam::{Config, Device, Model, Request};

const W: usize = 64;
const H: usize = 48;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("c-api-test");
        let cfg = Config::preset("tiny").unwrap();
        let opts = xsam::init::InitOptions {
            seed: 7,
            force: true,
            ..Default::default()
        };
        xsam::init::write_random_model_with(&cfg, dir.join("model"), &opts).unwrap();
        let img = image();
        image::RgbImage::from_raw(W as u32, H as u32, img.data)
            .unwrap()
            .save(dir.join("image.png"))
            .unwrap();
        dir
    })
}

/// The same pixels as `make_image` in test_capi.c.
fn image() -> RgbImage {
    let mut d = Vec::with_capacity(W * H * 3);
    for y in 0..H {
        for x in 0..W {
            let mut p = [
                (x * 255 / W) as u8,
                (y * 255 / H) as u8,
                ((x * y) % 256) as u8,
            ];
            if (8..24).contains(&x) && (10..26).contains(&y) {
                p = [220, 30, 30];
            }
            let (dx, dy) = (x as i64 - 44, y as i64 - 30);
            if dx * dx + dy * dy < 100 {
                p = [30, 200, 60];
            }
            d.extend_from_slice(&p);
        }
    }
    RgbImage::new(W, H, d).unwrap()
}

/// The directory holding the cdylib of this build. Cargo builds it, with the rlib, into
/// `target/<profile>/deps/` (next to this test binary) before integration tests; the copy in
/// `target/<profile>/` is only refreshed by `cargo build`, so it may be stale and comes second.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let profile = deps.parent().unwrap();
    for d in [deps, profile] {
        if d.join("libxsam.so").exists() || d.join("libxsam.dylib").exists() {
            return d.to_path_buf();
        }
    }
    panic!(
        "libxsam.so not found in {} or {} (the cdylib crate type is built with the library)",
        profile.display(),
        deps.display()
    );
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Compiles `src` with `compiler` and `flags`, linked to libxsam; returns the executable.
fn build(compiler: &str, src: &str, flags: &[&str], name: &str) -> PathBuf {
    let lib = lib_dir();
    let exe = work_dir().join(name);
    run(Command::new(compiler)
        .args(flags)
        .arg(root().join(src))
        .arg("-I")
        .arg(root().join("include"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lxsam")
        .arg("-o")
        .arg(&exe));
    exe
}

const C_FLAGS: &[&str] = &[
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
    "-O1",
];

fn test_capi_exe() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("cc", "tests/c/test_capi.c", C_FLAGS, "test_capi"))
}

/// `test_capi` linked against `libxsam.a`: no rpath, no libxsam.so needed at run time.
fn test_capi_static_exe() -> PathBuf {
    let lib = lib_dir().join("libxsam.a");
    assert!(lib.exists(), "{} (the staticlib crate type)", lib.display());
    let exe = work_dir().join("test_capi_static");
    run(Command::new("cc")
        .args(C_FLAGS)
        .arg(root().join("tests/c/test_capi.c"))
        .arg("-I")
        .arg(root().join("include"))
        .arg(&lib)
        .args(STATIC_LIBS)
        .arg("-o")
        .arg(&exe));
    exe
}

/// What a staticlib of this crate needs from the system on Linux (`rustc --print
/// native-static-libs`; dlopen for the dynamically loaded CUDA libraries is among them).
const STATIC_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// The memory budgets test_capi tries: the weights alone, weights + KV pool, everything.
fn budgets() -> [String; 3] {
    static B: OnceLock<[u64; 3]> = OnceLock::new();
    let b = B.get_or_init(|| {
        let model = Model::load(work_dir().join("model"), Device::Cpu).unwrap();
        let p = model.memory_plan().unwrap();
        [p.weights, p.weights + p.kv_pool, p.total()]
    });
    b.map(|v| v.to_string())
}

fn c_args(c: &mut Command) -> &mut Command {
    c.arg(work_dir().join("model"))
        .arg(work_dir().join("image.png"))
        .args(budgets())
}

fn c_command(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c_args(&mut c).env("LD_LIBRARY_PATH", lib_dir());
    c
}

/// What the C program printed: results, texts, masks and error lines by name.
#[derive(Default)]
struct COutput {
    results: HashMap<String, ResultJson>,
    texts: HashMap<String, String>,
    masks: HashMap<String, Vec<HashMap<String, String>>>,
    errors: Vec<(String, i32, String)>,
}

fn parse(stdout: &str) -> COutput {
    let mut o = COutput::default();
    for line in stdout.lines() {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "result" => {
                let (name, json) = rest.split_once(' ').unwrap();
                o.results
                    .insert(name.into(), serde_json::from_str(json).unwrap());
            }
            "text" => {
                let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                o.texts.insert(name.into(), text.into());
            }
            "mask" => {
                // the label (which may hold spaces) comes last
                let (rest, label) = rest.split_once(" label=").unwrap();
                let mut it = rest.split(' ');
                let name = it.next().unwrap().to_string();
                let _index = it.next().unwrap();
                let mut fields: HashMap<String, String> = it
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect();
                fields.insert("label".into(), label.into());
                o.masks.entry(name).or_default().push(fields);
            }
            "err" => {
                let mut it = rest.splitn(3, ' ');
                let name = it.next().unwrap().to_string();
                let code = it.next().unwrap().parse().unwrap();
                let msg = it.next().unwrap_or("").to_string();
                o.errors.push((name, code, msg));
            }
            _ => {}
        }
    }
    o
}

fn rust_requests() -> Vec<(&'static str, Request)> {
    let mut referring = Request::new(Task::Referring);
    referring.text = Some("the red square".into());
    referring.forced = true;
    let mut panoptic = Request::new(Task::Panoptic);
    panoptic.classes = vec!["square".into(), "disc".into()];
    panoptic.stuff = vec!["background".into()];
    panoptic.forced = true;
    panoptic.threshold = 0.0;
    let mut conversation = Request::new(Task::Conversation);
    conversation.text = Some("What is in the image?".into());
    conversation.max_new_tokens = 4;
    vec![
        ("referring", referring),
        ("panoptic", panoptic),
        ("conversation", conversation),
    ]
}

#[test]
fn c_program_matches_the_rust_api_and_reports_errors() {
    let exe = test_capi_exe();
    let out = run(&mut c_command(exe));
    check_c_output(&String::from_utf8_lossy(&out.stdout));
}

#[test]
fn c_program_linked_statically_matches_too() {
    let exe = test_capi_static_exe();
    let mut cmd = Command::new(&exe);
    c_args(&mut cmd).env_remove("LD_LIBRARY_PATH");
    let out = run(&mut cmd);
    check_c_output(&String::from_utf8_lossy(&out.stdout));
    // nothing of libxsam.so in the executable's dynamic dependencies
    if let Ok(out) = Command::new("ldd").arg(&exe).output() {
        let deps = String::from_utf8_lossy(&out.stdout);
        assert!(!deps.contains("libxsam"), "{deps}");
    }
}

/// Everything but the timings.
fn assert_same_result(got: &ResultJson, want: &ResultJson, name: &str) {
    assert_eq!(got.task, want.task, "{name}");
    assert_eq!(got.text, want.text, "{name}");
    assert_eq!(got.token_ids, want.token_ids, "{name}");
    assert_eq!(got.image, want.image, "{name}");
    assert_eq!(got.masks, want.masks, "{name}");
}

fn check_c_output(stdout: &str) {
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    assert!(stdout.contains(&format!("version {}", env!("CARGO_PKG_VERSION"))));
    let c = parse(stdout);

    let model = Model::load(work_dir().join("model"), Device::Cpu).unwrap();
    let mut session = model.session(&image()).unwrap();
    for (name, req) in rust_requests() {
        let want = session.run(&req).unwrap();
        let got = &c.results[name];
        assert_same_result(got, &want.result, name);
        assert_eq!(c.texts[name], want.result.text, "{name}");
        let masks = c.masks.get(name).cloned().unwrap_or_default();
        assert_eq!(masks.len(), want.masks.len(), "{name}");
        for (m, w) in masks.iter().zip(&want.masks) {
            assert_eq!(m["label"], w.label);
            assert_eq!(m["class"], w.class_index.to_string());
            let kind = match w.kind {
                xsam::task::postprocess::MaskKind::Thing => "0",
                xsam::task::postprocess::MaskKind::Stuff => "1",
            };
            assert_eq!(m["kind"], kind);
            // %.9g round-trips an f32 exactly
            assert_eq!(m["score"].parse::<f32>().unwrap(), w.score, "{name}");
            assert_eq!(m["segment"], w.segment_id.to_string());
            assert_eq!(m["size"], format!("{W}x{H}"));
            assert_eq!(m["area"], w.mask.count_ones().to_string());
            let counts: Vec<u64> = m["rle"].split(',').map(|s| s.parse().unwrap()).collect();
            assert_eq!(counts, rle::encode(&w.mask).counts, "{name}");
        }
        if name == "referring" {
            assert_eq!(want.masks.len(), 1);
        }
        if name == "panoptic" {
            assert!(!want.masks.is_empty(), "threshold 0 keeps segments");
        }
    }
    // the session on the PNG bytes sees the same pixels; aborted runs leave no trace
    for other in ["referring_png", "referring_after_abort"] {
        let (a, b) = (&c.results["referring"], &c.results[other]);
        assert_eq!(
            (&a.masks, &a.token_ids, &a.text),
            (&b.masks, &b.token_ids, &b.text)
        );
    }
    // the load progress: from 0 to exactly 1, never decreasing
    let progress: Vec<f32> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("progress "))
        .expect("a progress line")
        .split(' ')
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!((progress[0], progress[progress.len() - 1]), (0.0, 1.0));
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");

    let expected: &[(&str, i32, &str)] = &[
        ("load_null_path", -2, "xsam_model_load: path is NULL"),
        ("load_null_out", -2, "xsam_model_load: out_model is NULL"),
        ("load_bad_device", -1, "invalid device value 7"),
        (
            "load_missing_dir",
            -3,
            "/nonexistent/xsam-model does not exist",
        ),
        ("load_budget", -7, "more than the memory budget of 1 bytes"),
        (
            "session_null_model",
            -2,
            "xsam_session_from_rgb8: model is NULL",
        ),
        (
            "session_wrong_size",
            -1,
            "size is 9215 bytes but a 64x48 RGB8 image has 9216",
        ),
        (
            "session_zero_width",
            -1,
            "width and height must be positive, got 0x48",
        ),
        ("session_null_pixels", -2, "pixels is NULL"),
        (
            "session_bad_image",
            -5,
            "xsam_session_from_image: invalid input",
        ),
        (
            "session_wrong_handle",
            -1,
            "model is a Session handle, not a Model handle",
        ),
        ("run_null_session", -2, "xsam_session_run: session is NULL"),
        ("run_null_out", -2, "out_result is NULL"),
        ("run_bad_task", -1, "invalid task value 99 (expected 0..8)"),
        ("run_negative_task", -1, "invalid task value -1"),
        ("run_null_classes", -2, "classes is NULL but its count is 2"),
        (
            "run_zero_max_new_tokens",
            -1,
            "max_new_tokens must be positive, got 0",
        ),
        (
            "run_vprompt_wrong_size",
            -1,
            "vprompts[0]: size is 3071 bytes but a 64x48 mask has 3072",
        ),
        ("run_vprompt_wrong_image_size", -5, "visual prompt 1"),
        ("run_vprompt_wrong_task", -5, "does not take visual prompts"),
        (
            "run_aborted_first_poll",
            1,
            "xsam_session_run: aborted: the run was stopped before it started",
        ),
        (
            "run_aborted_mask_decoder",
            1,
            "the run was stopped before the mask decoder",
        ),
        (
            "run_aborted_tokens",
            1,
            "the run was stopped after 2 generated tokens",
        ),
        (
            "load_cancelled",
            1,
            "xsam_model_load: aborted: the model load was cancelled by the progress callback at 0%",
        ),
        (
            "load_cancelled_mid",
            1,
            "cancelled by the progress callback at",
        ),
        (
            "load_budget_kv",
            -7,
            "the weights fit, the KV pool does not",
        ),
        (
            "load_budget_arena",
            -7,
            "the weights and KV pool fit, the executor arena does not",
        ),
        ("text_small_buffer", 2, "the buffer holds 4 bytes"),
        ("text_null_result", -2, "xsam_result_text: result is NULL"),
        ("n_masks_null_out", -2, "n is NULL"),
        (
            "n_masks_wrong_handle",
            -1,
            "result is a Session handle, not a Result handle",
        ),
        ("mask_info_out_of_range", -1, "out of range"),
        (
            "bitmap_small_buffer",
            2,
            "the buffer holds 8 bytes, the 64x48 mask needs 3072",
        ),
        ("bitmap_null_buffer", -2, "buf is NULL"),
        (
            "model_free_with_sessions",
            -1,
            "the model still has 2 open session(s)",
        ),
        (
            "result_free_twice",
            -1,
            "result is not a live Result handle",
        ),
        ("result_free_null", 0, ""),
        (
            "session_free_twice",
            -1,
            "session is not a live Session handle",
        ),
        ("model_free_twice", -1, "model is not a live Model handle"),
    ];
    let names: Vec<&str> = c.errors.iter().map(|(n, _, _)| n.as_str()).collect();
    let want_names: Vec<&str> = expected.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(names, want_names);
    for ((name, code, msg), (_, want_code, want_msg)) in c.errors.iter().zip(expected) {
        assert_eq!(code, want_code, "{name}: {msg}");
        assert!(
            msg.contains(want_msg),
            "{name}: message `{msg}` lacks `{want_msg}`"
        );
        if *code < 0 || *code == 1 {
            assert!(!msg.is_empty(), "{name}: an error without a message");
        }
    }
}

#[test]
fn c_program_is_clean_under_valgrind() {
    if std::env::var("XSAM_VALGRIND").as_deref() != Ok("1") {
        eprintln!("SKIP valgrind run (set XSAM_VALGRIND=1)");
        return;
    }
    let exe = test_capi_exe();
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--error-exitcode=1",
        "--leak-check=full",
        "--errors-for-leak-kinds=definite",
        "--show-leak-kinds=definite",
    ])
    .arg(exe);
    c_args(&mut cmd).env("LD_LIBRARY_PATH", lib_dir());
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    // the error and leak summaries
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stderr.lines().filter(|l| {
        [
            "definitely lost",
            "indirectly lost",
            "still reachable",
            "ERROR SUMMARY",
        ]
        .iter()
        .any(|k| l.contains(k))
    }) {
        eprintln!("{l}");
    }
}

#[test]
fn cpp_program_matches_the_rust_api_and_header_compiles_as_c() {
    let exe = build(
        "c++",
        "tests/c/test_header.cpp",
        &["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"],
        "test_header",
    );
    let out = run(Command::new(&exe)
        .arg(work_dir().join("model"))
        .arg(work_dir().join("image.png"))
        .env("LD_LIBRARY_PATH", lib_dir()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
    let cpp = parse(&stdout);
    let model = Model::load(work_dir().join("model"), Device::Cpu).unwrap();
    let mut session = model.session(&image()).unwrap();
    for (name, req) in rust_requests().into_iter().take(2) {
        let want = session.run(&req).unwrap();
        assert_same_result(&cpp.results[name], &want.result, name);
    }
    assert!(!cpp.results["panoptic"].masks.is_empty());

    // and as C89-ish C with every warning
    let obj = work_dir().join("header_c.o");
    let src = work_dir().join("header_only.c");
    std::fs::write(&src, "#include \"xsam.h\"\nint xsam_header_only;\n").unwrap();
    run(Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-c"])
        .arg(&src)
        .arg("-I")
        .arg(root().join("include"))
        .arg("-o")
        .arg(obj));
}

/// `XSAM_API ... xsam_name(` in the header and `pub ... extern "C" fn xsam_name` in src/capi.rs
/// (every one `#[no_mangle]`) must be the same set.
#[test]
fn header_declares_every_exported_function() {
    let header = std::fs::read_to_string(root().join("include/xsam.h")).unwrap();
    let source = std::fs::read_to_string(root().join("src/capi.rs")).unwrap();
    let mut declared: Vec<String> = header
        .lines()
        .filter(|l| l.trim_start().starts_with("XSAM_API "))
        .map(|l| {
            let before = &l[..l.find('(').expect("a declaration on one line")];
            before.rsplit([' ', '*']).next().unwrap().to_string()
        })
        .collect();
    let mut exported: Vec<String> = vec![];
    let lines: Vec<&str> = source.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if let Some(at) = l.find("extern \"C\" fn ") {
            if !l.trim_start().starts_with("pub ") {
                continue;
            }
            let name = &l[at + 14..];
            let name = &name[..name.find('(').unwrap()];
            assert!(
                i > 0 && lines[i - 1].trim() == "#[no_mangle]",
                "{name} lacks #[no_mangle]"
            );
            exported.push(name.to_string());
        }
    }
    declared.sort();
    exported.sort();
    assert!(declared.iter().all(|n| n.starts_with("xsam_")));
    assert_eq!(declared, exported);
    assert!(exported.len() >= 19, "{exported:?}");

    // and the built library exports them (nm, when available)
    let so = lib_dir().join("libxsam.so");
    if let Ok(out) = Command::new("nm")
        .arg("-D")
        .arg("--defined-only")
        .arg(&so)
        .output()
    {
        if out.status.success() {
            let syms = String::from_utf8_lossy(&out.stdout);
            let mut dynamic: Vec<String> = syms
                .lines()
                .filter_map(|l| l.split_whitespace().last())
                .filter(|s| s.starts_with("xsam_"))
                .map(str::to_string)
                .collect();
            dynamic.sort();
            assert_eq!(dynamic, declared);
        }
    }
}

/// examples/c/main.c builds with the documented flags and runs.
#[test]
fn c_example_builds_and_runs() {
    let exe = build("cc", "examples/c/main.c", C_FLAGS, "xsam-example");
    let out = run(Command::new(&exe)
        .arg(work_dir().join("model"))
        .arg(work_dir().join("image.png"))
        .arg("the red square")
        .env("LD_LIBRARY_PATH", lib_dir()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("mask 0: the red square score"), "{stdout}");
}

/// The header's thread-safety statement: one model serves sessions running on several threads
/// at once, with the same results as one thread (called through the C functions from Rust).
#[test]
fn one_model_serves_sessions_on_several_threads() {
    use std::ffi::CString;
    use xsam::capi::*;
    let dir = CString::new(work_dir().join("model").to_str().unwrap()).unwrap();
    let mut model = std::ptr::null_mut();
    let rc = unsafe { xsam_model_load(dir.as_ptr(), xsam_model_default_params(), &mut model) };
    assert_eq!(rc, XSAM_OK);
    let px = image().data;
    let text = CString::new("the red square").unwrap();
    let model_addr = model as usize;
    let json_of = |seed: usize| -> String {
        let model = model_addr as *mut xsam_model;
        let mut session = std::ptr::null_mut();
        let mut res = std::ptr::null_mut();
        let mut buf = vec![0u8; 1 << 16];
        unsafe {
            let rc = xsam_session_from_rgb8(
                model,
                px.as_ptr(),
                px.len(),
                W as u32,
                H as u32,
                &mut session,
            );
            assert_eq!(rc, XSAM_OK, "thread {seed}");
            let mut p = xsam_request_default_params();
            p.task = 4; // XSAM_TASK_REFERRING
            p.text = text.as_ptr();
            p.forced = true;
            assert_eq!(xsam_session_run(session, p, &mut res), XSAM_OK);
            let mut need = 0;
            let rc = xsam_result_json(res, buf.as_mut_ptr().cast(), buf.len(), &mut need);
            assert_eq!(rc, XSAM_OK);
            buf.truncate(need - 1);
            assert_eq!(xsam_result_free(res), XSAM_OK);
            assert_eq!(xsam_session_free(session), XSAM_OK);
        }
        let r: ResultJson = serde_json::from_slice(&buf).unwrap();
        serde_json::to_string(&(r.masks, r.token_ids, r.text)).unwrap()
    };
    let single = json_of(0);
    let many: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..=3).map(|i| s.spawn(move || json_of(i))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for m in many {
        assert_eq!(m, single);
    }
    assert_eq!(unsafe { xsam_model_free(model) }, XSAM_OK);
}
