//! `xsam bench` smoke test: the tiny preset on the CPU runs, exits 0 and prints the table (no
//! timing assertions), writes the JSON, and `--device cuda` is a clean exit 2.

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_xsam");

fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tiny_preset_on_cpu_prints_the_table() {
    let d = dir("bench-cli");
    let json = d.join("bench.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--repeats",
            "2",
        ])
        .arg("--cache-dir")
        .arg(&d)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let last_header = lines
        .iter()
        .rposition(|l| l.starts_with("| stage") && l.contains("median ms") && l.contains("p90 ms"))
        .unwrap_or_else(|| panic!("no table header in\n{stdout}"));
    let rows = &lines[last_header + 2..];
    for stage in [
        "sam_encoder",
        "siglip_encoder",
        "llm_prefix",
        "referring/llm_prefill",
        "referring/second_prompt (reuse)",
        "panoptic/mask_decoder",
        "conversation/llm_generate",
    ] {
        assert!(
            rows.iter().any(|r| r.starts_with(&format!("| {stage} "))),
            "no row {stage} in\n{stdout}"
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["stages"].as_array().is_some_and(|s| !s.is_empty()));
}

#[test]
fn single_stages_on_the_tiny_preset() {
    let d = dir("bench-cli-stages");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--preset",
            "tiny",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--quiet",
        ])
        .args([
            "--stages",
            "sam_encoder,siglip_encoder,pixel_decoder,mask_decoder,llm_prefill_16,llm_decode_ctx16",
            "--profile-ops",
        ])
        .arg("--cache-dir")
        .arg(&d)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["pixel_decoder", "mask_decoder", "llm_decode_ctx16"] {
        assert!(stdout.contains(&format!("| {stage} ")), "{stdout}");
    }
    // --profile-ops: a per-op table per stage, before the stage table; the encoders' time is
    // mostly in linear nodes and the pixel decoder runs its deformable attention.
    let profile = stdout.find("op profile: sam_encoder").expect("sam profile");
    assert!(profile < stdout.rfind("| stage").unwrap_or(0), "{stdout}");
    let sam_table = &stdout[profile..];
    assert!(sam_table.contains("| linear "), "{stdout}");
    assert!(stdout.contains("| ms_deform_attn "), "{stdout}");
}

#[test]
fn cuda_is_a_clean_exit_2() {
    let d = dir("bench-cli-cuda");
    let out = Command::new(BIN)
        .args(["bench", "--preset", "tiny", "--device", "cuda"])
        .arg("--cache-dir")
        .arg(&d)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CUDA"), "{stderr}");
}
