//! Picture outputs: binary mask PNGs, a colour overlay of the result masks, and the procedurally
//! drawn images and visual prompts of `xsam demo`.

use crate::image::{GreyImage, RgbImage};
use crate::task::masks::BitMask;
use crate::task::postprocess::MaskResult;
use crate::{Error, Result};
use std::path::Path;

/// Distinct colours for overlays (cycled).
pub const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
];

fn save(path: &Path, data: &[u8], w: usize, h: usize, color: image::ColorType) -> Result<()> {
    image::save_buffer(path, data, w as u32, h as u32, color).map_err(|e| {
        Error::io(
            format!("writing {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Writes an RGB image as PNG.
pub fn save_rgb(path: impl AsRef<Path>, img: &RgbImage) -> Result<()> {
    save(
        path.as_ref(),
        &img.data,
        img.width,
        img.height,
        image::ColorType::Rgb8,
    )
}

/// Writes a grey image as PNG.
pub fn save_grey(path: impl AsRef<Path>, img: &GreyImage) -> Result<()> {
    save(
        path.as_ref(),
        &img.data,
        img.width,
        img.height,
        image::ColorType::L8,
    )
}

/// Writes a binary mask as an 8-bit PNG (0 / 255).
pub fn save_mask(path: impl AsRef<Path>, m: &BitMask) -> Result<()> {
    let data: Vec<u8> = m
        .to_u8()
        .iter()
        .map(|&v| if v != 0 { 255 } else { 0 })
        .collect();
    save(
        path.as_ref(),
        &data,
        m.width(),
        m.height(),
        image::ColorType::L8,
    )
}

/// The image with every mask blended in its palette colour (later masks on top) and a 1-pixel
/// outline; returns the overlay and the `(label, colour)` legend in mask order.
pub fn overlay(img: &RgbImage, masks: &[MaskResult]) -> (RgbImage, Vec<(String, [u8; 3])>) {
    let mut out = img.clone();
    let (w, h) = (img.width, img.height);
    let mut legend = vec![];
    for (i, m) in masks.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        legend.push((m.label.clone(), c));
        if m.mask.width() != w || m.mask.height() != h {
            continue;
        }
        for y in 0..h {
            for x in 0..w {
                if !m.mask.get(y, x) {
                    continue;
                }
                let edge = x == 0
                    || y == 0
                    || x + 1 == w
                    || y + 1 == h
                    || !m.mask.get(y, x - 1)
                    || !m.mask.get(y, x + 1)
                    || !m.mask.get(y - 1, x)
                    || !m.mask.get(y + 1, x);
                let p = &mut out.data[(y * w + x) * 3..(y * w + x) * 3 + 3];
                for ch in 0..3 {
                    p[ch] = if edge {
                        c[ch]
                    } else {
                        ((p[ch] as u16 + c[ch] as u16) / 2) as u8
                    };
                }
            }
        }
    }
    (out, legend)
}

fn in_circle(x: usize, y: usize, cx: f64, cy: f64, r: f64) -> bool {
    let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
    dx * dx + dy * dy <= r * r
}

/// The demo scene: a sky-to-ground gradient with a red circle, a blue box and a yellow triangle.
/// `variant` 1 moves and rescales the shapes (the cross-image vgd reference).
pub fn demo_image(w: usize, h: usize, variant: u32) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    let s = if variant == 0 { 1.0 } else { 0.8 };
    let (fw, fh) = (w as f64, h as f64);
    let (ccx, ccy, cr) = if variant == 0 {
        (fw * 0.28, fh * 0.55, fh * 0.22)
    } else {
        (fw * 0.7, fh * 0.45, fh * 0.2)
    };
    for y in 0..h {
        for x in 0..w {
            let (fx, fy) = (x as f64 / fw, y as f64 / fh);
            let mut p = if fy < 0.6 {
                [
                    (110.0 + 80.0 * fy) as u8,
                    (160.0 + 60.0 * fy) as u8,
                    (235.0 - 20.0 * fx) as u8,
                ]
            } else {
                [
                    (90.0 + 60.0 * fx) as u8,
                    (140.0 - 40.0 * fy) as u8,
                    (60.0 + 10.0 * fx) as u8,
                ]
            };
            if in_circle(x, y, ccx, ccy, cr) {
                p = [215, 40, 45];
            }
            let bx = if variant == 0 { 0.55 } else { 0.12 };
            if fx > bx && fx < bx + 0.25 * s && fy > 0.25 && fy < 0.25 + 0.4 * s {
                p = [40, 70, 200];
            }
            // triangle: apex (0.85, 0.6), base y = 0.95 from x 0.7 to 1.0
            let (tx, ty) = ((fx - 0.85) / 0.15, (fy - 0.6) / 0.35);
            if variant == 0 && (0.0..=1.0).contains(&ty) && tx.abs() <= ty {
                p = [240, 210, 40];
            }
            data.extend_from_slice(&p);
        }
    }
    RgbImage::new(w, h, data).expect("demo image size")
}

/// A visual prompt: a filled ellipse centred at `(cx, cy)` (fractions of the size) with radii
/// `(rx, ry)` (fractions), drawn like a user's scribble on the object.
pub fn ellipse_prompt(w: usize, h: usize, cx: f64, cy: f64, rx: f64, ry: f64) -> GreyImage {
    let mut d = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let dx = (x as f64 + 0.5) / w as f64 - cx;
            let dy = (y as f64 + 0.5) / h as f64 - cy;
            if (dx / rx).powi(2) + (dy / ry).powi(2) <= 1.0 {
                d[y * w + x] = 255;
            }
        }
    }
    GreyImage::new(w, h, d).expect("prompt size")
}
