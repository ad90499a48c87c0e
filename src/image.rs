//! Image input: decoding (PNG, JPEG, WebP) and the two preprocessing paths of X-SAM.
//!
//! * [`decode_image`] / [`load_image`]: any supported file to [`RgbImage`] (8-bit RGB, EXIF
//!   orientation applied). Bad input (corrupt, truncated, empty, zero-size, absurdly large) is an
//!   [`Error::Input`], never a panic, and the decoder never allocates what a lying header claims:
//!   dimensions and allocations are bounded by [`DecodeLimits`] before any pixel is read.
//! * [`decode_mask`] / [`load_mask`]: a visual-prompt mask as 8-bit grey (PIL's `convert("L")`).
//! * [`resize_u8`]: PIL's `Image.resize` on 8-bit data, reproduced exactly (see below).
//! * [`preprocess_sam`], [`preprocess_siglip`], [`preprocess_prompt_mask`]: the model inputs
//!   (xsam-architecture.md §2, interfaces.md §5.1).
//!
//! ## Why our own resampler
//! The reference pipeline resizes uint8 images with PIL (antialiased separable convolution with
//! 22-bit fixed-point coefficients, horizontal pass first, rounding and clipping to u8 after each
//! pass; NEAREST through PIL's affine scaler). `fast_image_resize` advertises PIL-like
//! convolution, but its coefficient rounding, pass order and u8 intermediate are implementation
//! details that may change between versions, and it has no PIL-exact NEAREST. Reproducing the
//! ~150 lines of Pillow's `Resample.c` / `Geometry.c` semantics here keeps the output bit-exact
//! with Pillow 11.3 (tests/preprocess.rs counts differing pixels: zero on the fixtures) and under
//! our control.

use crate::model::config::Resample;
use crate::{Error, Result, Tensor};
use std::io::Cursor;
use std::path::Path;

/// 8-bit RGB pixels, row-major HWC (`data.len() == width * height * 3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// 8-bit single-channel pixels, row-major (`data.len() == width * height`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreyImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Checks that `data` holds exactly `width * height * 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        check_buffer(width, height, 3, data.len(), "RGB image")?;
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// A `width x height` image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let data = rgb
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        Self {
            width,
            height,
            data,
        }
    }

    /// PIL `Image.resize((width, height), filter)`.
    pub fn resize(&self, width: usize, height: usize, filter: Filter) -> Result<RgbImage> {
        let data = resize_u8(
            &self.data,
            self.width,
            self.height,
            3,
            width,
            height,
            filter,
        )?;
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }
}

impl GreyImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        check_buffer(width, height, 1, data.len(), "grey image")?;
        Ok(Self {
            width,
            height,
            data,
        })
    }

    /// PIL `Image.resize((width, height), filter)` on an `L` image.
    pub fn resize(&self, width: usize, height: usize, filter: Filter) -> Result<GreyImage> {
        let data = resize_u8(
            &self.data,
            self.width,
            self.height,
            1,
            width,
            height,
            filter,
        )?;
        Ok(GreyImage {
            width,
            height,
            data,
        })
    }

    /// Number of nonzero ("on") pixels.
    pub fn count_on(&self) -> usize {
        self.data.iter().filter(|&&v| v != 0).count()
    }
}

fn check_buffer(
    width: usize,
    height: usize,
    channels: usize,
    len: usize,
    what: &str,
) -> Result<()> {
    let need = width
        .checked_mul(height)
        .and_then(|n| n.checked_mul(channels))
        .ok_or_else(|| Error::Input(format!("{what} of {width}x{height} is too large")))?;
    if need != len {
        return Err(Error::Input(format!(
            "{what} of {width}x{height}x{channels} needs {need} bytes, got {len}"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ decoding

/// Bounds applied before a decoder allocates anything.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest accepted width and height in pixels.
    pub max_side: u32,
    /// Memory budget of one decode, in bytes: the decoder's own allocations, and also the
    /// decoded buffer plus our RGB copy of it together.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    /// 16384 px per side and 1 GiB (an RGB image of up to ~178 megapixels): any camera photo,
    /// never a decompression bomb.
    fn default() -> Self {
        Self {
            max_side: 16384,
            max_alloc: 1 << 30,
        }
    }
}

/// Decodes PNG / JPEG / WebP bytes to 8-bit RGB with the default limits.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_with_limits(bytes, DecodeLimits::default())
}

/// Reads and decodes an image file.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading image {}", path.display()), e))?;
    decode_image(&bytes).map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("image {}: {m}", path.display())),
        e => e,
    })
}

/// Decodes to RGB8 as PIL's `Image.open(..).convert("RGB")` does, plus EXIF orientation:
/// grey is replicated, alpha is dropped (not composited), palettes are expanded; 16-bit RGB(A)
/// and grey-alpha keep the high byte (PIL's `RGB;16B` / `LA;16B` raw modes) and 16-bit grey
/// saturates at 255 (PIL's `I;16` -> `RGB`).
pub fn decode_image_with_limits(bytes: &[u8], limits: DecodeLimits) -> Result<RgbImage> {
    let img = decode_dynamic(bytes, limits)?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    use ::image::DynamicImage as D;
    let data: Vec<u8> = match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        D::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        D::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        D::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let g = v.min(255) as u8;
                [g, g, g]
            })
            .collect(),
        D::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let g = (p[0] >> 8) as u8;
                [g, g, g]
            })
            .collect(),
        D::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage::new(width, height, data)
}

/// Decodes a visual-prompt mask as 8-bit grey with the default limits (any nonzero pixel is
/// "on"). Colour masks are converted as PIL's `convert("L")` (ITU-R 601 luma, alpha ignored);
/// 16-bit grey saturates at 255 as PIL's `I;16` -> `L`.
pub fn decode_mask(bytes: &[u8]) -> Result<GreyImage> {
    let img = decode_dynamic(bytes, DecodeLimits::default())?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    use ::image::DynamicImage as D;
    // PIL Convert.c `L24`: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
    let luma = |r: u8, g: u8, b: u8| -> u8 {
        ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
    };
    let data: Vec<u8> = match img {
        D::ImageLuma8(b) => b.into_raw(),
        D::ImageLumaA8(b) => b.into_raw().chunks_exact(2).map(|p| p[0]).collect(),
        D::ImageLuma16(b) => b.into_raw().iter().map(|&v| v.min(255) as u8).collect(),
        D::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .map(|p| (p[0] >> 8) as u8)
            .collect(),
        other => {
            let rgb = decode_rgb_from(other);
            rgb.chunks_exact(3)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect()
        }
    };
    GreyImage::new(width, height, data)
}

/// Reads and decodes a prompt-mask file.
pub fn load_mask(path: impl AsRef<Path>) -> Result<GreyImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading mask {}", path.display()), e))?;
    decode_mask(&bytes).map_err(|e| match e {
        Error::Input(m) => Error::Input(format!("mask {}: {m}", path.display())),
        e => e,
    })
}

fn decode_rgb_from(img: ::image::DynamicImage) -> Vec<u8> {
    use ::image::DynamicImage as D;
    match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        D::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    }
}

fn decode_dynamic(bytes: &[u8], limits: DecodeLimits) -> Result<::image::DynamicImage> {
    use ::image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
    if bytes.is_empty() {
        return Err(Error::Input("empty image data".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Input(format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => {}
        Some(f) => {
            return Err(Error::Input(format!(
                "unsupported image format {f:?} (expected PNG, JPEG or WebP)"
            )))
        }
        None => {
            return Err(Error::Input(
                "unrecognised image data (expected PNG, JPEG or WebP)".into(),
            ))
        }
    }
    let mut lim = ::image::Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_alloc);
    let mut reader = reader;
    reader.limits(lim);
    let mut decoder = reader.into_decoder().map_err(describe)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Input(format!("image has zero size ({w}x{h})")));
    }
    if w > limits.max_side || h > limits.max_side {
        return Err(Error::Input(format!(
            "image of {w}x{h} exceeds the limit of {} pixels per side",
            limits.max_side
        )));
    }
    // The decoded buffer, plus the RGB copy we make of it, must fit the allocation limit.
    let total = decoder
        .total_bytes()
        .saturating_add(w as u64 * h as u64 * 3);
    if total > limits.max_alloc {
        return Err(Error::Input(format!(
            "image of {w}x{h} needs {total} bytes to decode, over the limit of {} bytes",
            limits.max_alloc
        )));
    }
    // An unreadable EXIF block is not worth failing the image over: keep it upright as stored.
    let orientation = decoder.orientation().ok();
    let mut img = DynamicImage::from_decoder(decoder).map_err(describe)?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Input("image has zero size".into()));
    }
    Ok(img)
}

fn describe(e: ::image::ImageError) -> Error {
    use ::image::ImageError as E;
    match e {
        E::Limits(l) => Error::Input(format!(
            "image exceeds the decoding limits ({l}); the header claims dimensions or memory beyond what is accepted"
        )),
        E::Decoding(d) => Error::Input(format!("corrupt or truncated image: {d}")),
        E::Unsupported(u) => Error::Input(format!("unsupported image: {u}")),
        E::IoError(io) => Error::Input(format!("corrupt or truncated image: {io}")),
        other => Error::Input(format!("cannot decode image: {other}")),
    }
}

// ---------------------------------------------------------------------------------- resampling

/// PIL resampling filters (on 8-bit data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Bilinear,
    Bicubic,
}

impl From<Resample> for Filter {
    fn from(r: Resample) -> Self {
        match r {
            Resample::Bilinear => Filter::Bilinear,
            Resample::Bicubic => Filter::Bicubic,
        }
    }
}

/// Pillow `Resample.c`: 32 - 8 bits of pixel - 2 bits of headroom.
const PRECISION_BITS: u32 = 22;

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: first input index, number of taps and fixed-point weights (`ksize` each).
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc` for the full box `0..in_size`.
fn precompute_coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let (f, support): (fn(f64) -> f64, f64) = match filter {
        Filter::Bicubic => (bicubic_filter, 2.0),
        _ => (bilinear_filter, 1.0),
    };
    // PIL computes `(double)(in1 - in0) / outSize` with float box corners; exact for our sizes.
    let scale = in_size as f32 as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64)
            .min(in_size as i64)
            .max(xmin as i64) as usize
            - xmin;
        let n = xmax.min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            // Pillow: `filter((x + xmin - center + 0.5) * inv_filterscale)`.
            let w = f(((x + xmin) as f64 - center + 0.5) * inv);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL `Image.resize((out_w, out_h), filter)` of a row-major `channels`-interleaved u8 image.
/// Bilinear / bicubic: horizontal pass first into a u8 image of the needed rows, then the
/// vertical pass; a pass whose size does not change is skipped. Nearest: PIL's affine scaler
/// (source index `int(x0 + (x + 0.5) * in / out)` accumulated in f64 as PIL does).
pub fn resize_u8(
    src: &[u8],
    in_w: usize,
    in_h: usize,
    channels: usize,
    out_w: usize,
    out_h: usize,
    filter: Filter,
) -> Result<Vec<u8>> {
    check_buffer(in_w, in_h, channels, src.len(), "resize input")?;
    if in_w == 0 || in_h == 0 || out_w == 0 || out_h == 0 {
        return Err(Error::Input(format!(
            "cannot resize {in_w}x{in_h} to {out_w}x{out_h}: sizes must be positive"
        )));
    }
    out_w
        .checked_mul(out_h)
        .and_then(|n| n.checked_mul(channels))
        .filter(|&n| n <= 1 << 32)
        .ok_or_else(|| Error::Input(format!("resize target {out_w}x{out_h} is too large")))?;
    if in_w == out_w && in_h == out_h {
        return Ok(src.to_vec());
    }
    if filter == Filter::Nearest {
        return Ok(resize_nearest(src, in_w, in_h, channels, out_w, out_h));
    }
    let c = channels;
    let vert = precompute_coeffs(in_h, out_h, filter);
    // Rows of the source that the vertical pass reads.
    let y_first = vert.bounds[0].0;
    let y_last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
    let (tmp, tmp_w, row0) = if in_w != out_w {
        let hor = precompute_coeffs(in_w, out_w, filter);
        let rows = y_last - y_first;
        let mut tmp = vec![0u8; rows * out_w * c];
        for y in 0..rows {
            let line = &src[(y + y_first) * in_w * c..(y + y_first + 1) * in_w * c];
            let out = &mut tmp[y * out_w * c..(y + 1) * out_w * c];
            for xx in 0..out_w {
                let (xmin, n) = hor.bounds[xx];
                let k = &hor.weights[xx * hor.ksize..xx * hor.ksize + n];
                for ch in 0..c {
                    let mut ss: i32 = 1 << (PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        ss += line[(x + xmin) * c + ch] as i32 * kx;
                    }
                    out[xx * c + ch] = clip8(ss);
                }
            }
        }
        (std::borrow::Cow::Owned(tmp), out_w, y_first)
    } else {
        (std::borrow::Cow::Borrowed(src), in_w, 0)
    };
    if in_h == out_h {
        return Ok(tmp.into_owned());
    }
    let stride = tmp_w * c;
    let mut out = vec![0u8; out_h * stride];
    for yy in 0..out_h {
        let (ymin, n) = vert.bounds[yy];
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        let o = &mut out[yy * stride..(yy + 1) * stride];
        for (i, ov) in o.iter_mut().enumerate() {
            let mut ss: i32 = 1 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss += tmp[(y + ymin - row0) * stride + i] as i32 * ky;
            }
            *ov = clip8(ss);
        }
    }
    Ok(out)
}

/// Pillow `ImagingScaleAffine` (what `resize(.., NEAREST)` runs): positions accumulated in f64,
/// truncated; pixels mapping outside the source stay 0 (PIL fills the output first).
fn resize_nearest(
    src: &[u8],
    in_w: usize,
    in_h: usize,
    c: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    let coord = |v: f64| -> i64 {
        if v < 0.0 {
            -1
        } else {
            v as i64
        }
    };
    let a0 = in_w as f32 as f64 / out_w as f64;
    let a4 = in_h as f32 as f64 / out_h as f64;
    let mut xin = vec![None; out_w];
    let mut xo = a0 * 0.5;
    for slot in xin.iter_mut() {
        let xi = coord(xo);
        if xi >= 0 && (xi as usize) < in_w {
            *slot = Some(xi as usize);
        }
        xo += a0;
    }
    let mut out = vec![0u8; out_w * out_h * c];
    let mut yo = a4 * 0.5;
    for y in 0..out_h {
        let yi = coord(yo);
        if yi >= 0 && (yi as usize) < in_h {
            let line = &src[yi as usize * in_w * c..(yi as usize + 1) * in_w * c];
            let o = &mut out[y * out_w * c..(y + 1) * out_w * c];
            for (x, xi) in xin.iter().enumerate() {
                if let Some(xi) = xi {
                    o[x * c..(x + 1) * c].copy_from_slice(&line[xi * c..(xi + 1) * c]);
                }
            }
        }
        yo += a4;
    }
    out
}

// ------------------------------------------------------------------------------- preprocessing

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
pub const SIGLIP_MEAN: [f32; 3] = [0.5, 0.5, 0.5];
pub const SIGLIP_STD: [f32; 3] = [0.5, 0.5, 0.5];
/// xtuner `expand2square` background: `int(0.5 * 255)` per channel.
pub const SIGLIP_PAD_FILL: [u8; 3] = [127, 127, 127];

/// The SAM input of one image.
#[derive(Clone, Debug)]
pub struct SamInput {
    /// `[1, 3, S, S]`: normalised, zero-padded bottom/right after normalisation.
    pub pixel_values: Tensor,
    /// `(newh, neww)`: the resized image's size inside the padded canvas (for un-padding masks).
    pub scaled_size: (usize, usize),
    /// The original image size `(height, width)`.
    pub original_size: (usize, usize),
}

/// X-SAM `_get_preprocess_shape`: longest side to `target`, round half up, in f64 as Python.
pub fn sam_scaled_size(height: usize, width: usize, target: usize) -> (usize, usize) {
    let scale = target as f64 * 1.0 / height.max(width) as f64;
    let (h, w) = (height as f64 * scale, width as f64 * scale);
    // Python `int(x + 0.5)` truncates; at least one pixel so a 1x10000 image stays resizable.
    (((h + 0.5) as usize).max(1), ((w + 0.5) as usize).max(1))
}

/// Rescale as HF `image_transforms.rescale` (f64 multiply by 1/255, then f32), normalise in f32,
/// and write channels-first into `out` (`[3, stride_h, stride_w]`, top-left anchored).
fn normalise_into(img: &RgbImage, mean: [f32; 3], std: [f32; 3], out: &mut [f32], side: usize) {
    let plane = side * side;
    for y in 0..img.height {
        for x in 0..img.width {
            let p = &img.data[(y * img.width + x) * 3..(y * img.width + x) * 3 + 3];
            for ch in 0..3 {
                let v = (p[ch] as f64 * (1.0 / 255.0)) as f32;
                out[ch * plane + y * side + x] = (v - mean[ch]) / std[ch];
            }
        }
    }
}

/// The SAM path: resize the longest side to `image_size` (PIL bilinear), rescale, ImageNet
/// normalisation, zero pad bottom/right to `image_size`².
pub fn preprocess_sam(img: &RgbImage, image_size: usize) -> Result<SamInput> {
    if image_size == 0 {
        return Err(Error::Input("SAM image size is 0".into()));
    }
    let (newh, neww) = sam_scaled_size(img.height, img.width, image_size);
    let resized = img.resize(neww, newh, Filter::Bilinear)?;
    let mut px = vec![0f32; 3 * image_size * image_size];
    normalise_into(&resized, IMAGENET_MEAN, IMAGENET_STD, &mut px, image_size);
    Ok(SamInput {
        pixel_values: Tensor::from_f32(px, [1, 3, image_size, image_size])?,
        scaled_size: (newh, neww),
        original_size: (img.height, img.width),
    })
}

/// xtuner `expand2square`: a `max(h, w)`² canvas of `fill` with the image pasted centered
/// (offset `(side - h) / 2` rows or `(side - w) / 2` columns).
pub fn expand2square(img: &RgbImage, fill: [u8; 3]) -> RgbImage {
    if img.width == img.height {
        return img.clone();
    }
    let side = img.width.max(img.height);
    let mut sq = RgbImage::filled(side, side, fill);
    let (oy, ox) = ((side - img.height) / 2, (side - img.width) / 2);
    for y in 0..img.height {
        let s = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        let d0 = ((y + oy) * side + ox) * 3;
        sq.data[d0..d0 + img.width * 3].copy_from_slice(s);
    }
    sq
}

/// The SigLIP path: centered pad to a square with (127,127,127), resize to `image_size`² with
/// `filter`, `(x / 255 - 0.5) / 0.5`. Returns `[1, 3, V, V]`.
pub fn preprocess_siglip(img: &RgbImage, image_size: usize, filter: Filter) -> Result<Tensor> {
    if image_size == 0 {
        return Err(Error::Input("SigLIP image size is 0".into()));
    }
    let sq = expand2square(img, SIGLIP_PAD_FILL);
    let resized = sq.resize(image_size, image_size, filter)?;
    let mut px = vec![0f32; 3 * image_size * image_size];
    normalise_into(&resized, SIGLIP_MEAN, SIGLIP_STD, &mut px, image_size);
    Tensor::from_f32(px, [1, 3, image_size, image_size])
}

/// A prompt mask on the SAM canvas: NEAREST resize of the grey mask to `scaled_size`
/// `(newh, neww)`, zero pad to `image_size`². Returns the `image_size`² grey values row-major
/// (nonzero = on). The mask must have the size of the image it was drawn on, and a mask with no
/// nonzero pixel left after the resize is an error (interfaces.md §5.1).
pub fn preprocess_prompt_mask(
    mask: &GreyImage,
    image_hw: (usize, usize),
    scaled_size: (usize, usize),
    image_size: usize,
) -> Result<Vec<u8>> {
    if (mask.height, mask.width) != image_hw {
        return Err(Error::Input(format!(
            "prompt mask is {}x{} (w x h) but its image is {}x{}",
            mask.width, mask.height, image_hw.1, image_hw.0
        )));
    }
    let (newh, neww) = scaled_size;
    if newh > image_size || neww > image_size {
        return Err(Error::Input(format!(
            "scaled size {newh}x{neww} exceeds the canvas {image_size}"
        )));
    }
    let r = mask.resize(neww, newh, Filter::Nearest)?;
    if r.count_on() == 0 {
        return Err(Error::Input(format!(
            "prompt mask is empty after resizing to {neww}x{newh} (it had {} nonzero pixels of {})",
            mask.count_on(),
            mask.data.len()
        )));
    }
    let mut out = vec![0u8; image_size * image_size];
    for y in 0..newh {
        out[y * image_size..y * image_size + neww]
            .copy_from_slice(&r.data[y * neww..(y + 1) * neww]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_size_rounds_half_up() {
        assert_eq!(sam_scaled_size(61, 192, 96), (31, 96));
        assert_eq!(sam_scaled_size(77, 123, 128), (80, 128));
        assert_eq!(sam_scaled_size(1, 10000, 1024), (1, 1024));
    }

    #[test]
    fn same_size_is_identity_and_bad_sizes_fail() {
        let img = RgbImage::filled(3, 2, [1, 2, 3]);
        assert_eq!(img.resize(3, 2, Filter::Bicubic).unwrap(), img);
        assert!(img.resize(0, 2, Filter::Bilinear).is_err());
        assert!(resize_u8(&[0; 5], 3, 2, 1, 4, 4, Filter::Bilinear).is_err());
    }

    #[test]
    fn constant_images_stay_constant() {
        let img = RgbImage::filled(7, 5, [200, 10, 127]);
        for f in [Filter::Nearest, Filter::Bilinear, Filter::Bicubic] {
            for (w, h) in [(3, 2), (20, 11), (1, 1), (7, 9)] {
                let r = img.resize(w, h, f).unwrap();
                assert_eq!(r, RgbImage::filled(w, h, [200, 10, 127]), "{f:?} {w}x{h}");
            }
        }
    }

    #[test]
    fn expand2square_centres() {
        let img = RgbImage::new(1, 3, vec![1, 1, 1, 2, 2, 2, 3, 3, 3]).unwrap();
        let sq = expand2square(&img, [9, 9, 9]);
        assert_eq!((sq.width, sq.height), (3, 3));
        assert_eq!(&sq.data[3..6], &[1, 1, 1]);
        assert_eq!(&sq.data[0..3], &[9, 9, 9]);
    }
}
