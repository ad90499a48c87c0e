//! Preprocessing parity with PIL (Pillow 11.3, tests/fixtures/*.safetensors made by
//! reference/make_fixtures_encoders.py) and bad-input handling of the decoder.
//!
//! Requirement: every u8 pixel within 1 of PIL. We also count pixels that differ at all and
//! expect none (the resampler reproduces Pillow's fixed-point arithmetic), so the test reports
//! the count and fails above the tolerance only.

mod common;

use common::Fixture;
use xsam::image::{
    decode_image, decode_image_with_limits, decode_mask, expand2square, preprocess_prompt_mask,
    preprocess_sam, preprocess_siglip, sam_scaled_size, DecodeLimits, Filter, GreyImage, RgbImage,
    IMAGENET_STD, SIGLIP_PAD_FILL,
};
use xsam::Error;

/// Compares u8 buffers: panics if any pixel is off by more than 1; returns how many differ.
fn compare_u8(what: &str, ours: &[u8], pil: &[u8]) -> usize {
    assert_eq!(ours.len(), pil.len(), "{what}: sizes differ");
    let mut differ = 0;
    let mut worst = 0;
    for (&a, &b) in ours.iter().zip(pil) {
        let d = (a as i32 - b as i32).abs();
        worst = worst.max(d);
        differ += (d != 0) as usize;
    }
    assert!(worst <= 1, "{what}: a pixel differs from PIL by {worst}");
    differ
}

fn case_hw(case: &serde_json::Value, key: &str) -> (usize, usize) {
    let a = case[key].as_array().unwrap_or_else(|| panic!("no {key}"));
    (
        a[0].as_u64().unwrap() as usize,
        a[1].as_u64().unwrap() as usize,
    )
}

#[test]
fn resize_cases_match_pil() {
    let fx = Fixture::open("preprocess_resize");
    let (mut total, mut differ) = (0usize, 0usize);
    for (n, case) in fx.cases().iter().enumerate() {
        let img = fx.image(n);
        let (h, w) = case_hw(case, "image_hw");
        assert_eq!((img.height, img.width), (h, w));
        let s = case["sam_image_size"].as_u64().unwrap() as usize;
        let v = case["siglip_image_size"].as_u64().unwrap() as usize;

        // SAM path: scaled size and PIL bilinear.
        let (newh, neww) = sam_scaled_size(h, w, s);
        assert_eq!((newh, neww), case_hw(case, "sam_scaled_size"), "case {n}");
        let (pil, shape) = fx.u8(&format!("case{n}.sam_resized"));
        assert_eq!(shape, [newh, neww, 3]);
        let ours = img.resize(neww, newh, Filter::Bilinear).unwrap();
        differ += compare_u8(&format!("case {n} sam bilinear"), &ours.data, &pil);
        total += pil.len();

        // SigLIP path: expand2square exact, then bilinear and bicubic.
        let sq = expand2square(&img, SIGLIP_PAD_FILL);
        let (pil_sq, shape) = fx.u8(&format!("case{n}.siglip_square"));
        let side = case["square_side"].as_u64().unwrap() as usize;
        assert_eq!(shape, [side, side, 3]);
        assert_eq!(sq.data, pil_sq, "case {n}: expand2square");
        for (name, f) in [("bilinear", Filter::Bilinear), ("bicubic", Filter::Bicubic)] {
            let (pil, _) = fx.u8(&format!("case{n}.siglip_resized_{name}"));
            let ours = sq.resize(v, v, f).unwrap();
            differ += compare_u8(&format!("case {n} siglip {name}"), &ours.data, &pil);
            total += pil.len();
        }

        // Prompt mask: NEAREST exactly, then zero pad.
        let (m, shape) = fx.u8(&format!("case{n}.mask"));
        assert_eq!(shape, [h, w]);
        let mask = GreyImage::new(w, h, m).unwrap();
        let (pil, _) = fx.u8(&format!("case{n}.mask_resized_nearest"));
        let ours = mask.resize(neww, newh, Filter::Nearest).unwrap();
        assert_eq!(ours.data, pil, "case {n}: mask nearest");
        let padded = preprocess_prompt_mask(&mask, (h, w), (newh, neww), s).unwrap();
        for y in 0..s {
            for x in 0..s {
                let want = if y < newh && x < neww {
                    pil[y * neww + x]
                } else {
                    0
                };
                assert_eq!(padded[y * s + x], want, "case {n}: padded mask at {y},{x}");
            }
        }
    }
    println!("preprocess_resize: {differ} of {total} resized u8 values differ from PIL");
    assert_eq!(differ, 0, "expected bit-exact PIL resampling");
}

#[test]
fn sam_inputs_match_fixtures() {
    for stem in ["sam_a", "sam_b"] {
        let fx = Fixture::open(stem);
        let s = fx.json["config"]["sam"]["image_size"].as_u64().unwrap() as usize;
        for (n, case) in fx.cases().iter().enumerate() {
            let img = fx.image(n);
            let input = preprocess_sam(&img, s).unwrap();
            assert_eq!(
                input.scaled_size,
                case_hw(case, "scaled_size"),
                "{stem} case {n}"
            );
            let (sz, _) = fx.i64(&format!("case{n}.sam_scaled_size"));
            assert_eq!(
                [input.scaled_size.0 as i64, input.scaled_size.1 as i64],
                sz[..]
            );
            let (pil, _) = fx.u8(&format!("case{n}.sam_resized"));
            let (newh, neww) = input.scaled_size;
            let resized = img.resize(neww, newh, Filter::Bilinear).unwrap();
            let differ = compare_u8(&format!("{stem} case {n}"), &resized.data, &pil);
            assert_eq!(differ, 0, "{stem} case {n}: resized pixels differ from PIL");
            let (want, shape) = fx.f32(&format!("case{n}.input.sam_pixel_values"));
            assert_eq!(shape, [1, 3, s, s]);
            let got = input.pixel_values.to_vec_f32().unwrap();
            // Within 1/255/std (one u8 step); exact in practice (same f64 rescale, f32 normalise).
            let tol =
                1.0 / 255.0 / IMAGENET_STD.iter().cloned().fold(f32::MAX, f32::min) as f64 + 1e-6;
            let d = common::max_abs_diff(&got, &want);
            assert!(d <= tol, "{stem} case {n}: pixel values differ by {d}");
            assert_eq!(
                d, 0.0,
                "{stem} case {n}: pixel values not bitwise equal (max diff {d})"
            );
        }
    }
}

#[test]
fn siglip_inputs_match_fixtures() {
    for stem in ["siglip_a", "siglip_b"] {
        let fx = Fixture::open(stem);
        let v = fx.json["config"]["vision"]["image_size"].as_u64().unwrap() as usize;
        assert_eq!(fx.json["config"]["vision"]["resample"], "bilinear");
        for n in 0..fx.cases().len() {
            let img = fx.image(n);
            let sq = expand2square(&img, SIGLIP_PAD_FILL);
            assert_eq!(
                sq.data,
                fx.u8(&format!("case{n}.siglip_square")).0,
                "{stem} case {n}"
            );
            let resized = sq.resize(v, v, Filter::Bilinear).unwrap();
            let differ = compare_u8(
                &format!("{stem} case {n}"),
                &resized.data,
                &fx.u8(&format!("case{n}.siglip_resized")).0,
            );
            assert_eq!(differ, 0);
            let got = preprocess_siglip(&img, v, Filter::Bilinear).unwrap();
            assert_eq!(got.dims(), [1, 3, v, v]);
            let (want, _) = fx.f32(&format!("case{n}.input.siglip_pixel_values"));
            let d = common::max_abs_diff(&got.to_vec_f32().unwrap(), &want);
            assert!(d <= 2.0 / 255.0 + 1e-6, "{stem} case {n}: {d}");
            assert_eq!(
                d, 0.0,
                "{stem} case {n}: pixel values not bitwise equal (max diff {d})"
            );
        }
    }
}

// ------------------------------------------------------------------------------ decoding

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    v.extend_from_slice(&body);
    v.extend_from_slice(&crc32(&body).to_be_bytes());
    v
}

/// A PNG signature + IHDR claiming `w x h` RGB8, then `rest` (chunks).
fn png_with_header(w: u32, h: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend(png_chunk(b"IHDR", &ihdr));
    v.extend_from_slice(rest);
    v
}

fn encode_png(w: u32, h: u32, color: image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(data, w, h, color)
        .unwrap();
    out
}

fn assert_input_err(r: xsam::Result<RgbImage>, what: &str) -> String {
    match r {
        Err(e @ Error::Input(_)) => {
            let msg = e.to_string();
            println!("{what}: {msg}");
            msg
        }
        Err(e) => panic!("{what}: expected an input error, got {e}"),
        Ok(i) => panic!("{what}: decoded a {}x{} image", i.width, i.height),
    }
}

#[test]
fn bad_images_are_clear_errors() {
    let good = encode_png(5, 4, image::ExtendedColorType::Rgb8, &[7u8; 60]);
    assert_eq!(
        decode_image(&good).unwrap(),
        RgbImage::filled(5, 4, [7, 7, 7])
    );

    assert_input_err(decode_image(&[]), "empty");
    // Deterministic "random" bytes (xorshift).
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    assert_input_err(decode_image(&noise), "random bytes");
    for cut in [8, 20, 33, good.len() / 2, good.len() - 13] {
        assert_input_err(
            decode_image(&good[..cut]),
            &format!("PNG truncated at {cut}"),
        );
    }
    // Corrupt the compressed data but keep the CRCs plausible: flip bytes inside IDAT.
    let mut bad = good.clone();
    let idat = bad.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut bad[idat + 4..idat + 10] {
        *b ^= 0x5A;
    }
    assert_input_err(decode_image(&bad), "corrupt IDAT");
    // Zero-size and absurd headers: rejected before any pixel buffer is allocated.
    let iend = png_chunk(b"IEND", &[]);
    assert_input_err(decode_image(&png_with_header(0, 10, &iend)), "zero width");
    assert_input_err(decode_image(&png_with_header(10, 0, &iend)), "zero height");
    let msg = assert_input_err(
        decode_image(&png_with_header(100_000, 100_000, &iend)),
        "100000x100000",
    );
    assert!(msg.contains("limit"), "{msg}");
    // A header within the side limit but over the allocation limit.
    let tight = DecodeLimits {
        max_side: 100_000,
        max_alloc: 1 << 20,
    };
    let mut idat_iend = png_chunk(b"IDAT", &[0x78, 0x9c, 0x01, 0x00]);
    idat_iend.extend_from_slice(&iend);
    let msg = assert_input_err(
        decode_image_with_limits(&png_with_header(4000, 4000, &idat_iend), tight),
        "alloc limit",
    );
    assert!(msg.contains("limit"), "{msg}");
    // A JPEG SOI with nothing after it, and a GIF (unsupported format).
    assert_input_err(decode_image(&[0xFF, 0xD8, 0xFF]), "truncated JPEG");
    assert_input_err(decode_image(b"GIF89a\x01\x00\x01\x00"), "GIF");
    // A WebP RIFF header with garbage inside.
    assert_input_err(
        decode_image(b"RIFF\x20\x00\x00\x00WEBPVP8 \x10\x00\x00\x00garbage"),
        "bad WebP",
    );
}

#[test]
fn colour_types_become_rgb8() {
    use image::ExtendedColorType as C;
    // Grey replicated.
    let g = decode_image(&encode_png(2, 1, C::L8, &[10, 200])).unwrap();
    assert_eq!(g.data, [10, 10, 10, 200, 200, 200]);
    // Alpha dropped without compositing (PIL convert("RGB")).
    let rgba = decode_image(&encode_png(1, 1, C::Rgba8, &[1, 2, 3, 0])).unwrap();
    assert_eq!(rgba.data, [1, 2, 3]);
    let la = decode_image(&encode_png(1, 1, C::La8, &[9, 0])).unwrap();
    assert_eq!(la.data, [9, 9, 9]);
    // 16-bit RGB keeps the high byte (PIL's RGB;16B); big-endian samples in the encoder input.
    let rgb16: Vec<u8> = [0x1234u16, 0xFF01, 0x00FF]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let d = decode_image(&encode_png(1, 1, C::Rgb16, &rgb16)).unwrap();
    assert_eq!(d.data, [0x12, 0xFF, 0x00]);
    // 16-bit grey saturates (PIL's I;16 -> RGB).
    let l16: Vec<u8> = [5u16, 300].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let d = decode_image(&encode_png(2, 1, C::L16, &l16)).unwrap();
    assert_eq!(d.data, [5, 5, 5, 255, 255, 255]);
    // JPEG and WebP (lossless) decode.
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
        .encode(&[128u8; 8 * 8 * 3], 8, 8, C::Rgb8)
        .unwrap();
    let j = decode_image(&jpg).unwrap();
    assert_eq!((j.width, j.height), (8, 8));
    assert!(j.data.iter().all(|&v| (v as i32 - 128).abs() <= 2));
    let mut webp = Vec::new();
    let px: Vec<u8> = (0..6 * 3).map(|i| (i * 13) as u8).collect();
    image::codecs::webp::WebPEncoder::new_lossless(&mut webp)
        .encode(&px, 3, 2, C::Rgb8)
        .unwrap();
    assert_eq!(decode_image(&webp).unwrap().data, px);
}

#[test]
fn exif_orientation_is_applied() {
    use image::ExtendedColorType as C;
    // 2x1 image: red then blue. An eXIf chunk with orientation 6 (rotate 90 degrees clockwise)
    // turns it into a 1x2 image: red on top.
    let plain = encode_png(2, 1, C::Rgb8, &[255, 0, 0, 0, 0, 255]);
    let mut exif = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    exif.extend_from_slice(&[
        0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let idat = plain.windows(4).position(|w| w == b"IDAT").unwrap() - 4;
    let mut with_exif = plain[..idat].to_vec();
    with_exif.extend(png_chunk(b"eXIf", &exif));
    with_exif.extend_from_slice(&plain[idat..]);
    let img = decode_image(&with_exif).unwrap();
    assert_eq!((img.width, img.height), (1, 2));
    assert_eq!(img.data, [255, 0, 0, 0, 0, 255]);
}

#[test]
fn masks_decode_as_pil_grey() {
    use image::ExtendedColorType as C;
    let m = decode_mask(&encode_png(3, 1, C::L8, &[0, 1, 255])).unwrap();
    assert_eq!(m.data, [0, 1, 255]);
    assert_eq!(m.count_on(), 2);
    // RGB masks use PIL's luma: (1, 0, 0) rounds to 0 as in convert("L").
    let m = decode_mask(&encode_png(2, 1, C::Rgb8, &[1, 0, 0, 255, 255, 255])).unwrap();
    assert_eq!(m.data, [0, 255]);
    assert!(matches!(decode_mask(b"not an image"), Err(Error::Input(_))));
    // A mask of the wrong size for its image is an error.
    let mask = GreyImage::new(3, 1, vec![1, 0, 1]).unwrap();
    assert!(preprocess_prompt_mask(&mask, (2, 3), (2, 3), 4).is_err());
    // Empty, or emptied by the NEAREST resize (one pixel in 9x9 sampled away): errors.
    let empty = GreyImage::new(3, 1, vec![0, 0, 0]).unwrap();
    assert!(matches!(
        preprocess_prompt_mask(&empty, (1, 3), (1, 3), 4),
        Err(Error::Input(_))
    ));
    let mut d = vec![0u8; 81];
    d[0] = 255;
    let speck = GreyImage::new(9, 9, d).unwrap();
    let e = preprocess_prompt_mask(&speck, (9, 9), (3, 3), 4).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}
