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
/// outline and its number and label drawn at the mask's top-left; returns the overlay and the `(label, colour)` legend in mask order.
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
    // labels at the top-left of each mask's box, clamped into the image
    let max_chars = (w.saturating_sub(3) / 6).max(1);
    for (i, m) in masks.iter().enumerate() {
        if m.mask.width() != w || m.mask.height() != h {
            continue;
        }
        if let Some((x0, y0, _, _)) = m.mask.bbox() {
            let text: String = format!("{} {}", i + 1, m.label)
                .chars()
                .take(max_chars)
                .collect();
            let tw = text.chars().count() * 6 + 3;
            let x = x0.min(w.saturating_sub(tw));
            let y = y0.min(h.saturating_sub(11));
            draw_label(
                &mut out,
                x,
                y,
                &text,
                PALETTE[i % PALETTE.len()].map(|v| v / 2),
            );
        }
    }
    (out, legend)
}

/// A 5x7 bitmap font for labels: (ASCII byte, 7 rows of 5 bits, bit 4 leftmost). Letters are
/// drawn upper-case; other characters as a box.
const FONT: &[(u8, [u8; 7])] = &[
    (65, [0xe, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11]), // 'A'
    (66, [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e]), // 'B'
    (67, [0xe, 0x11, 0x10, 0x10, 0x10, 0x11, 0xe]),  // 'C'
    (68, [0x1e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1e]), // 'D'
    (69, [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f]), // 'E'
    (70, [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10]), // 'F'
    (71, [0xe, 0x11, 0x10, 0x17, 0x11, 0x11, 0xf]),  // 'G'
    (72, [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11]), // 'H'
    (73, [0xe, 0x4, 0x4, 0x4, 0x4, 0x4, 0xe]),       // 'I'
    (74, [0x7, 0x2, 0x2, 0x2, 0x2, 0x12, 0xc]),      // 'J'
    (75, [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11]), // 'K'
    (76, [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f]), // 'L'
    (77, [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11]), // 'M'
    (78, [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11]), // 'N'
    (79, [0xe, 0x11, 0x11, 0x11, 0x11, 0x11, 0xe]),  // 'O'
    (80, [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10]), // 'P'
    (81, [0xe, 0x11, 0x11, 0x11, 0x15, 0x12, 0xd]),  // 'Q'
    (82, [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11]), // 'R'
    (83, [0xf, 0x10, 0x10, 0xe, 0x1, 0x1, 0x1e]),    // 'S'
    (84, [0x1f, 0x4, 0x4, 0x4, 0x4, 0x4, 0x4]),      // 'T'
    (85, [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0xe]), // 'U'
    (86, [0x11, 0x11, 0x11, 0x11, 0x11, 0xa, 0x4]),  // 'V'
    (87, [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0xa]), // 'W'
    (88, [0x11, 0x11, 0xa, 0x4, 0xa, 0x11, 0x11]),   // 'X'
    (89, [0x11, 0x11, 0x11, 0xa, 0x4, 0x4, 0x4]),    // 'Y'
    (90, [0x1f, 0x1, 0x2, 0x4, 0x8, 0x10, 0x1f]),    // 'Z'
    (48, [0xe, 0x11, 0x13, 0x15, 0x19, 0x11, 0xe]),  // '0'
    (49, [0x4, 0xc, 0x4, 0x4, 0x4, 0x4, 0xe]),       // '1'
    (50, [0xe, 0x11, 0x1, 0x2, 0x4, 0x8, 0x1f]),     // '2'
    (51, [0x1f, 0x2, 0x4, 0x2, 0x1, 0x11, 0xe]),     // '3'
    (52, [0x2, 0x6, 0xa, 0x12, 0x1f, 0x2, 0x2]),     // '4'
    (53, [0x1f, 0x10, 0x1e, 0x1, 0x1, 0x11, 0xe]),   // '5'
    (54, [0x6, 0x8, 0x10, 0x1e, 0x11, 0x11, 0xe]),   // '6'
    (55, [0x1f, 0x1, 0x2, 0x4, 0x8, 0x8, 0x8]),      // '7'
    (56, [0xe, 0x11, 0x11, 0xe, 0x11, 0x11, 0xe]),   // '8'
    (57, [0xe, 0x11, 0x11, 0xf, 0x1, 0x2, 0xc]),     // '9'
    (46, [0x0, 0x0, 0x0, 0x0, 0x0, 0xc, 0xc]),       // '.'
    (44, [0x0, 0x0, 0x0, 0x0, 0xc, 0x4, 0x8]),       // ','
    (45, [0x0, 0x0, 0x0, 0x1f, 0x0, 0x0, 0x0]),      // '-'
    (63, [0xe, 0x11, 0x1, 0x2, 0x4, 0x0, 0x4]),      // '?'
    (58, [0x0, 0xc, 0xc, 0x0, 0xc, 0xc, 0x0]),       // ':'
    (32, [0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0]),       // ' '
];

fn glyph(c: char) -> [u8; 7] {
    let c = c.to_ascii_uppercase();
    FONT.iter()
        .find(|(b, _)| c.is_ascii() && *b == c as u8)
        .map_or([0x1f, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1f], |g| g.1)
}

/// Draws `text` at `(x, y)` (top-left) in white on a `bg` box, clipped to the image; one glyph
/// is 6x9 pixels with spacing.
pub fn draw_label(img: &mut RgbImage, x: usize, y: usize, text: &str, bg: [u8; 3]) {
    let (w, h) = (img.width, img.height);
    let n = text.chars().count();
    let (bw, bh) = (n * 6 + 3, 11);
    let mut put = |px: usize, py: usize, c: [u8; 3]| {
        if px < w && py < h {
            img.data[(py * w + px) * 3..(py * w + px) * 3 + 3].copy_from_slice(&c);
        }
    };
    for py in y..y + bh {
        for px in x..x + bw {
            put(px, py, bg);
        }
    }
    for (i, ch) in text.chars().enumerate() {
        let g = glyph(ch);
        for (r, bits) in g.iter().enumerate() {
            for c in 0..5 {
                if bits & (0x10 >> c) != 0 {
                    put(x + 2 + i * 6 + c, y + 2 + r, [255, 255, 255]);
                }
            }
        }
    }
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
