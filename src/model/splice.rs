//! Building the LLM input (architecture notes §6.3): text ids go through `embed_tokens`, the
//! `<image>` placeholder becomes the image block (vision tokens then SAM tokens) and each
//! `<region>` one region vector. Positions are simply 0..T over the spliced sequence.

use crate::model::phi3::Phi3;
use crate::task::prompt::PromptToken;
use crate::{Error, Result, Tensor};

/// The spliced sequence and where things landed in it.
pub struct Spliced {
    /// `[T, hidden]`.
    pub embeds: Tensor,
    /// Token id at each position; `None` where a vector was injected.
    pub ids: Vec<Option<u32>>,
    /// First position of the image block, and its length.
    pub image: Option<(usize, usize)>,
    /// Position of each region vector, in prompt order.
    pub regions: Vec<usize>,
}

/// Splices `tokens` with `image` (`[N, hidden]`, required when the prompt has `<image>`) and
/// `regions` (one `hidden`-vector per `<region>`, in order).
pub fn splice(
    llm: &Phi3,
    tokens: &[PromptToken],
    image: Option<&Tensor>,
    regions: &[Vec<f32>],
) -> Result<Spliced> {
    let d = llm.config().hidden_size;
    let mut rows: Vec<f32> = Vec::new();
    let mut ids = Vec::new();
    let mut image_at = None;
    let mut region_at = vec![];
    let mut pending: Vec<u32> = vec![];
    let flush = |pending: &mut Vec<u32>, rows: &mut Vec<f32>| -> Result<()> {
        if !pending.is_empty() {
            rows.extend(llm.embed(pending)?);
            pending.clear();
        }
        Ok(())
    };
    for t in tokens {
        match *t {
            PromptToken::Id(i) => {
                pending.push(i);
                ids.push(Some(i));
            }
            PromptToken::Image => {
                flush(&mut pending, &mut rows)?;
                let img = image.ok_or_else(|| {
                    Error::Input("the prompt has <image> but no image was given".into())
                })?;
                if image_at.is_some() {
                    return Err(Error::Input("the prompt has more than one <image>".into()));
                }
                let n = img.dim(0)?;
                if img.dims() != [n, d] {
                    return Err(Error::shape(
                        "splice",
                        format!("image block {} is not [N, {d}]", img.shape()),
                    ));
                }
                image_at = Some((ids.len(), n));
                rows.extend(img.to_vec_f32()?);
                ids.extend(std::iter::repeat_n(None, n));
            }
            PromptToken::Region(k) => {
                flush(&mut pending, &mut rows)?;
                let v = regions.get(k).ok_or_else(|| {
                    Error::Input(format!(
                        "the prompt has {} <region> tags but {} visual prompts were given",
                        k + 1,
                        regions.len()
                    ))
                })?;
                if v.len() != d {
                    return Err(Error::shape(
                        "splice",
                        format!("region vector of {} values, expected {d}", v.len()),
                    ));
                }
                region_at.push(ids.len());
                rows.extend_from_slice(v);
                ids.push(None);
            }
        }
    }
    flush(&mut pending, &mut rows)?;
    if region_at.len() != regions.len() {
        return Err(Error::Input(format!(
            "{} visual prompts were given but the prompt has {} <region> tags",
            regions.len(),
            region_at.len()
        )));
    }
    let t = ids.len();
    Ok(Spliced {
        embeds: Tensor::from_f32(rows, [t, d])?,
        ids,
        image: image_at,
        regions: region_at,
    })
}
