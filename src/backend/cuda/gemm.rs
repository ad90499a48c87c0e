//! GEMMs through cuBLASLt: bf16 operands, f32 accumulation, bf16 or f32 output, fused bias and
//! GELU/ReLU epilogues, a per-shape cache of matmul descriptors and chosen algorithms.
//!
//! Row-major tensors in a column-major library. cuBLASLt reads a matrix as column-major: the bytes
//! of our row-major `X [r, c]` are, to cuBLASLt, the column-major `c x r` matrix `Xᵀ` with leading
//! dimension `c`. So instead of `D = A · op(B)` (our `D [m, n]`) we ask for
//! `Dᵀ = op(B)ᵀ · Aᵀ`, whose column-major result `n x m` (ld `n`) is exactly our row-major
//! `D [m, n]`. In cuBLASLt's terms:
//! - its "A" is our `b`: needed as `n x k`. A linear weight `b [n, k]` (`b_transposed`) reads as
//!   `k x n` (ld k), so TRANSA = T; a plain `b [k, n]` reads as `n x k` (ld n) already, TRANSA = N.
//! - its "B" is our `a [m, k]`: reads as `k x m` (ld k), which is what is needed, TRANSB = N.
//! - its "C"/"D" is `n x m` (ld n); its problem size (M, N, K) is our (n, m, k).
//! - the bias epilogue adds a vector along D's rows, i.e. one value per output feature `n`.
//!
//! One cuBLASLt handle and one 32 MiB workspace per backend (all work is on one stream, so they
//! are never used by two GEMMs at once), created on first use. cuBLASLt is loaded dynamically
//! like the driver: a missing libcublasLt is an error, never a panic.

use super::buffer::DeviceBuffer;
use super::context::{backend_err, driver_err, guarded, CudaBackend};
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};
use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// What cuBLASLt fuses after the product (and the bias, when given).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    None,
    /// cuBLASLt's GELU is the tanh approximation: only for SigLIP's `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

/// cuBLASLt workspace: NVIDIA recommends 32 MiB on Hopper (4 MiB before); one size for all.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Everything that selects a cuBLASLt plan. Pointer alignments are part of it because the
/// heuristic only offers kernels whose alignment needs the operands meet (a tensor view at an
/// odd offset gets a different, slower kernel, not a misaligned access).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmKey {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub b_transposed: bool,
    /// Operand dtype as handed to cuBLASLt (always bf16 today: f32/f16 operands are cast first).
    pub operands: DType,
    pub out: DType,
    pub epilogue: Epilogue,
    /// Bias dtype as handed to cuBLASLt (the output dtype: see `gemm_into`), `None` without bias.
    pub bias: Option<DType>,
    /// Byte alignment (power of two, at most 256) of our a, b and d pointers.
    pub align_a: u32,
    pub align_b: u32,
    pub align_d: u32,
}

/// Largest power of two dividing `addr`, capped at 256 (cuBLASLt's default assumption).
pub(crate) fn pointer_alignment(addr: u64) -> u32 {
    if addr == 0 {
        return 256;
    }
    (1u64 << addr.trailing_zeros().min(8)) as u32
}

fn cuda_type(dt: DType) -> ltsys::cudaDataType {
    match dt {
        DType::F32 => ltsys::cudaDataType::CUDA_R_32F,
        DType::BF16 => ltsys::cudaDataType::CUDA_R_16BF,
        DType::F16 => ltsys::cudaDataType::CUDA_R_16F,
    }
}

/// The cuBLASLt epilogue for `e` with or without a bias vector.
fn lt_epilogue(e: Epilogue, bias: bool) -> ltsys::cublasLtEpilogue_t {
    use ltsys::cublasLtEpilogue_t as E;
    match (e, bias) {
        (Epilogue::None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
        (Epilogue::None, true) => E::CUBLASLT_EPILOGUE_BIAS,
        (Epilogue::GeluTanh, false) => E::CUBLASLT_EPILOGUE_GELU,
        (Epilogue::GeluTanh, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
        (Epilogue::Relu, false) => E::CUBLASLT_EPILOGUE_RELU,
        (Epilogue::Relu, true) => E::CUBLASLT_EPILOGUE_RELU_BIAS,
    }
}

fn lt_err(what: &str, key: &GemmKey, e: lt::CublasError) -> Error {
    backend_err(format!("cuBLASLt {what} ({key:?}): {e}"))
}

/// A matmul descriptor, the three layouts (C and D share one) and the chosen algorithm.
struct Plan {
    desc: ltsys::cublasLtMatmulDesc_t,
    /// cuBLASLt's A (our b), B (our a) and C = D (our output), see the module docs.
    layout_a: ltsys::cublasLtMatrixLayout_t,
    layout_b: ltsys::cublasLtMatrixLayout_t,
    layout_d: ltsys::cublasLtMatrixLayout_t,
    algo: ltsys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by `Plan::new`, destroyed once here; null handles are skipped. Errors
        // while tearing down are ignored (nothing useful can be done with them in a drop).
        unsafe {
            for l in [self.layout_a, self.layout_b, self.layout_d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}

/// Sets one attribute of a layout from a plain value.
///
/// # Safety
/// `layout` must be live and `T` the attribute's C type.
unsafe fn set_layout<T>(
    layout: ltsys::cublasLtMatrixLayout_t,
    attr: ltsys::cublasLtMatrixLayoutAttribute_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    lt::set_matrix_layout_attribute(
        layout,
        attr,
        (v as *const T).cast(),
        std::mem::size_of::<T>(),
    )
}

/// # Safety
/// `desc` must be live and `T` the attribute's C type.
unsafe fn set_desc<T>(
    desc: ltsys::cublasLtMatmulDesc_t,
    attr: ltsys::cublasLtMatmulDescAttributes_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_desc_attribute(desc, attr, (v as *const T).cast(), std::mem::size_of::<T>())
}

/// # Safety
/// `pref` must be live and `T` the attribute's C type.
unsafe fn set_pref<T>(
    pref: ltsys::cublasLtMatmulPreference_t,
    attr: ltsys::cublasLtMatmulPreferenceAttributes_t,
    v: &T,
) -> std::result::Result<(), lt::CublasError> {
    lt::set_matmul_pref_attribute(pref, attr, (v as *const T).cast(), std::mem::size_of::<T>())
}

/// Destroys a preference descriptor when dropped (the heuristic query may fail half-way).
struct Pref(ltsys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

impl Plan {
    /// Builds the descriptors for `key` and asks the heuristic for its best algorithm (once per
    /// key; the answer is cached by the caller). `bias` is this call's bias address (set before
    /// the query so the descriptor is complete; later calls set their own).
    fn new(handle: ltsys::cublasLtHandle_t, key: &GemmKey, bias: Option<u64>) -> Result<Plan> {
        use ltsys::cublasLtMatmulDescAttributes_t as D;
        use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
        use ltsys::cublasLtMatrixLayoutAttribute_t as L;
        let e = |what: &str, err| lt_err(what, key, err);
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        let mut plan = Plan {
            desc: std::ptr::null_mut(),
            layout_a: std::ptr::null_mut(),
            layout_b: std::ptr::null_mut(),
            layout_d: std::ptr::null_mut(),
            algo: ltsys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.desc = lt::create_matmul_desc(
            ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ltsys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|x| e("cublasLtMatmulDescCreate", x))?;
        // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (int32 attributes).
        let trans_a: i32 = key.b_transposed as i32;
        let trans_b: i32 = 0;
        let epi = lt_epilogue(key.epilogue, key.bias.is_some()) as u32;
        // SAFETY: the descriptor is live; TRANSA/TRANSB are int32, EPILOGUE is uint32.
        unsafe {
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSA, &trans_a)
                .map_err(|x| e("TRANSA", x))?;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_TRANSB, &trans_b)
                .map_err(|x| e("TRANSB", x))?;
            set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)
                .map_err(|x| e("EPILOGUE", x))?;
            // BIAS_DATA_TYPE stays at its default, "same as D": the caller casts the bias to
            // the output dtype, the combination cuBLASLt supports for every epilogue with bf16
            // and f32 outputs. BIAS_POINTER is a `void*`.
            if let Some(p) = bias {
                set_desc(plan.desc, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p)
                    .map_err(|x| e("BIAS_POINTER", x))?;
            }
        }

        // Stored (pre-op) shapes in cuBLASLt's column-major view, see the module docs.
        let (a_rows, a_cols, lda) = if key.b_transposed {
            (k, n, key.k as i64)
        } else {
            (n, k, key.n as i64)
        };
        let op_type = cuda_type(key.operands);
        plan.layout_a = lt::create_matrix_layout(op_type, a_rows, a_cols, lda)
            .map_err(|x| e("layout of b", x))?;
        plan.layout_b = lt::create_matrix_layout(op_type, k, m, key.k as i64)
            .map_err(|x| e("layout of a", x))?;
        plan.layout_d = lt::create_matrix_layout(cuda_type(key.out), n, m, key.n as i64)
            .map_err(|x| e("layout of the output", x))?;
        if key.batch > 1 {
            let count = i32::try_from(key.batch)
                .map_err(|_| Error::shape("gemm_batched", "batch exceeds i32"))?;
            // BATCH_COUNT is int32, STRIDED_BATCH_OFFSET int64 in elements; dense batches.
            let strides = [
                (plan.layout_a, n * k),
                (plan.layout_b, m * k),
                (plan.layout_d, m * n),
            ];
            for (layout, stride) in strides {
                let stride = stride as i64;
                // SAFETY: live layouts, attribute types as above.
                unsafe {
                    set_layout(layout, L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count)
                        .map_err(|x| e("BATCH_COUNT", x))?;
                    set_layout(
                        layout,
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride,
                    )
                    .map_err(|x| e("STRIDED_BATCH_OFFSET", x))?;
                }
            }
        }

        let pref = Pref(lt::create_matmul_pref().map_err(|x| e("preference", x))?);
        let ws = WORKSPACE_BYTES as u64;
        // MIN_ALIGNMENT_*: uint32; cuBLASLt's A is our b and its B our a.
        // SAFETY: live preference; MAX_WORKSPACE_BYTES is uint64, the alignments uint32.
        unsafe {
            set_pref(pref.0, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws)
                .map_err(|x| e("MAX_WORKSPACE_BYTES", x))?;
            set_pref(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                &key.align_b,
            )
            .map_err(|x| e("MIN_ALIGNMENT_A", x))?;
            set_pref(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                &key.align_a,
            )
            .map_err(|x| e("MIN_ALIGNMENT_B", x))?;
            set_pref(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                &key.align_d,
            )
            .map_err(|x| e("MIN_ALIGNMENT_C", x))?;
            set_pref(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                &key.align_d,
            )
            .map_err(|x| e("MIN_ALIGNMENT_D", x))?;
        }
        // SAFETY: all descriptors are live; C and D share a layout (beta = 0, C is D).
        let heuristic = unsafe {
            lt::get_matmul_algo_heuristic(
                handle,
                plan.desc,
                plan.layout_a,
                plan.layout_b,
                plan.layout_d,
                plan.layout_d,
                pref.0,
            )
        }
        .map_err(|x| e("found no algorithm (cublasLtMatmulAlgoGetHeuristic)", x))?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }
}

/// The per-backend cuBLASLt state: handle, workspace and the plan cache.
pub(crate) struct LtState {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    plans: HashMap<GemmKey, Plan>,
}

// SAFETY: the handle and descriptors are plain heap objects of cuBLASLt; `LtState` lives in a
// Mutex, so they are used by one thread at a time.
unsafe impl Send for LtState {}

impl Drop for LtState {
    fn drop(&mut self) {
        self.plans.clear();
        if !self.handle.is_null() {
            // SAFETY: created by create_handle, destroyed once; the error is ignorable here.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }
}

/// The lazily created cuBLASLt state of a backend (a field of `CudaBackend`).
pub(crate) type LtCell = std::sync::OnceLock<std::result::Result<Mutex<LtState>, String>>;

impl CudaBackend {
    /// The cuBLASLt state, created on first use (handle + workspace). Called before a capture
    /// begins so that the workspace is never a graph allocation.
    pub(crate) fn lt(&self) -> Result<&Mutex<LtState>> {
        self.lt_cell()
            .get_or_init(|| {
                guarded("loading cuBLASLt", || self.lt_create())
                    .map(Mutex::new)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|msg| backend_err(msg.clone()))
    }

    fn lt_create(&self) -> Result<LtState> {
        // SAFETY: only tries to dlopen the candidate names.
        if !unsafe { ltsys::is_culib_present() } {
            return Err(backend_err(
                "cuBLASLt not found (libcublasLt.so could not be loaded; install the CUDA \
                 runtime libraries or add their folder to LD_LIBRARY_PATH)",
            ));
        }
        self.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| driver_err("binding the context", e))?;
        let handle =
            lt::create_handle().map_err(|e| backend_err(format!("cublasLtCreate: {e}")))?;
        // SAFETY: plain bytes, written by cuBLASLt only.
        let workspace = match unsafe { self.stream().alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: just created, destroyed once.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(driver_err("allocating the cuBLASLt workspace", e));
            }
        };
        Ok(LtState {
            handle,
            workspace,
            plans: HashMap::new(),
        })
    }

    /// Number of cached cuBLASLt plans (for tests: a repeated shape must not add one).
    pub fn gemm_plan_count(&self) -> usize {
        match self.lt() {
            Ok(m) => m.lock().unwrap_or_else(|p| p.into_inner()).plans.len(),
            Err(_) => 0,
        }
    }

    /// `y[m, n] = a[m, k] · b (+ bias[n]) (epilogue)`, where `b` is `[n, k]` when `b_transposed`
    /// (a linear layer's weight) else `[k, n]`. `a` may have leading dims (flattened into m).
    /// Operands are bf16 (f32 operands are cast to bf16 first), accumulation is f32, `bias` is
    /// bf16 or f32, the output dtype is `out` (bf16 or f32).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
    ) -> Result<Tensor> {
        const OP: &str = "gemm";
        let ad = a.dims();
        if ad.is_empty() {
            return Err(Error::shape(OP, "a is a scalar; it needs at least [k]"));
        }
        let k = ad[ad.len() - 1];
        let m = ad[..ad.len() - 1].iter().product::<usize>();
        let bd = b.dims();
        if bd.len() != 2 {
            return Err(Error::shape(
                OP,
                format!("b must be 2-D, got {}", b.shape()),
            ));
        }
        let (bk, n) = if b_transposed {
            (bd[1], bd[0])
        } else {
            (bd[0], bd[1])
        };
        if bk != k {
            return Err(Error::shape(
                OP,
                format!(
                    "a {} · b {}{}: inner dims {k} and {bk} differ",
                    a.shape(),
                    b.shape(),
                    if b_transposed { "ᵀ" } else { "" }
                ),
            ));
        }
        let mut out_dims = ad[..ad.len() - 1].to_vec();
        out_dims.push(n);
        self.gemm_checked(
            OP,
            a,
            b,
            b_transposed,
            bias,
            epilogue,
            out,
            (1, m, n, k),
            out_dims,
        )
    }

    /// Strided-batched `y[i] = a[i] · b[i]` for `a [B, m, k]` and `b [B, k, n]` (or `[B, n, k]`
    /// when `b_transposed`), same dtype rules as [`gemm`](Self::gemm).
    pub fn gemm_batched(
        &self,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        out: DType,
    ) -> Result<Tensor> {
        const OP: &str = "gemm_batched";
        let (ad, bd) = (a.dims(), b.dims());
        if ad.len() != 3 || bd.len() != 3 {
            return Err(Error::shape(
                OP,
                format!("a and b must be 3-D, got {} and {}", a.shape(), b.shape()),
            ));
        }
        let (batch, m, k) = (ad[0], ad[1], ad[2]);
        let (bk, n) = if b_transposed {
            (bd[2], bd[1])
        } else {
            (bd[1], bd[2])
        };
        if bd[0] != batch || bk != k {
            return Err(Error::shape(
                OP,
                format!(
                    "a {} · b {}{}: batch or inner dims differ",
                    a.shape(),
                    b.shape(),
                    if b_transposed { " (transposed)" } else { "" }
                ),
            ));
        }
        self.gemm_checked(
            OP,
            a,
            b,
            b_transposed,
            None,
            Epilogue::None,
            out,
            (batch, m, n, k),
            vec![batch, m, n],
        )
    }

    /// Shapes are checked; checks dtypes and devices, casts, allocates and queues.
    #[allow(clippy::too_many_arguments)]
    fn gemm_checked(
        &self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
        (batch, m, n, k): (usize, usize, usize, usize),
        out_dims: Vec<usize>,
    ) -> Result<Tensor> {
        if out == DType::F16 {
            return Err(Error::DType {
                op,
                expected: "bf16 or f32 output".into(),
                found: out.to_string(),
            });
        }
        if let Some(bias) = bias {
            if bias.numel() != n {
                return Err(Error::shape(
                    op,
                    format!("bias {} must hold n = {n} values", bias.shape()),
                ));
            }
        }
        for t in [Some(a), Some(b), bias].into_iter().flatten() {
            let buf = gemm_buffer(op, t)?;
            self.check_device(op, buf)?;
            if !t.is_contiguous() {
                return Err(Error::shape(op, format!("{t:?} is not contiguous")));
            }
        }
        let bytes = batch
            .checked_mul(m)
            .and_then(|x| x.checked_mul(n))
            .and_then(|x| x.checked_mul(out.size_in_bytes()))
            .ok_or_else(|| Error::shape(op, "output size overflows"))?;
        if bytes == 0 {
            return Ok(Tensor::from_device(self.alloc(0)?, out, out_dims.into()));
        }
        // bf16 operands for the tensor cores (cast is a no-op for bf16 inputs).
        let a = self.cast(a, DType::BF16)?;
        let b = self.cast(b, DType::BF16)?;
        // The bias goes in D's dtype (cuBLASLt's default bias type for bf16/f32 outputs).
        let bias = bias.map(|t| self.cast(t, out)).transpose()?;
        if k == 0 {
            return self.gemm_empty_k(op, bias.as_ref(), epilogue, out, out_dims);
        }
        let mut y = self.alloc(bytes)?;
        self.gemm_into(
            op,
            &a,
            &b,
            b_transposed,
            bias.as_ref(),
            epilogue,
            out,
            (batch, m, n, k),
            &mut y,
        )?;
        Ok(Tensor::from_device(y, out, out_dims.into()))
    }

    /// k = 0: the product is all zeros, so the result is epilogue(bias) on every row (or 0).
    /// Rare (no model shape has it); done on the host.
    fn gemm_empty_k(
        &self,
        op: &'static str,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
        out_dims: Vec<usize>,
    ) -> Result<Tensor> {
        let n = out_dims.last().copied().unwrap_or(0);
        let row: Vec<f32> = match bias {
            Some(bias) => self.to_host(bias)?.to_vec_f32()?,
            None => vec![0.0; n],
        };
        let row: Vec<f32> = row
            .into_iter()
            .map(|x| match epilogue {
                Epilogue::None => x,
                Epilogue::Relu => x.max(0.0),
                Epilogue::GeluTanh => {
                    let c = (2.0 / std::f32::consts::PI).sqrt();
                    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
                }
            })
            .collect();
        let rows = out_dims.iter().product::<usize>() / n.max(1);
        let all: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
        let host = Tensor::from_vec(all, out_dims)?;
        let host = match out {
            DType::F32 => host,
            _ => host.to_dtype(out)?,
        };
        self.to_device(&host)
            .map_err(|e| backend_err(format!("{op}: {e}")))
    }

    /// Queues the cuBLASLt matmul: bf16 `a` and `b` (contiguous, on this device), bias already in
    /// `out`'s dtype, `y` at least `batch·m·n` elements of `out`; all sizes non-zero.
    #[allow(clippy::too_many_arguments)]
    fn gemm_into(
        &self,
        op: &'static str,
        a: &Tensor,
        b: &Tensor,
        b_transposed: bool,
        bias: Option<&Tensor>,
        epilogue: Epilogue,
        out: DType,
        (batch, m, n, k): (usize, usize, usize, usize),
        y: &mut DeviceBuffer,
    ) -> Result<()> {
        let stream = self.stream();
        let pa = self.gemm_addr(op, a, batch * m * k)?;
        let pb = self.gemm_addr(op, b, batch * n * k)?;
        // A bias view at an odd offset: copy it to a fresh (256-byte aligned) buffer, since
        // cuBLASLt has no alignment preference for the bias.
        let bias_owned;
        let bias = match bias {
            Some(t) if pointer_alignment(self.gemm_addr(op, t, n)?) < 16 => {
                bias_owned = self.copy_device(t)?;
                Some(&bias_owned)
            }
            other => other,
        };
        let pbias = bias.map(|t| self.gemm_addr(op, t, n)).transpose()?;
        let pd = {
            let view = y
                .view::<u8>(0, batch * m * n * out.size_in_bytes())
                .ok_or_else(|| {
                    backend_err(format!("{op}: output buffer is smaller than the product"))
                })?;
            let (p, _sync) = view.device_ptr(stream);
            p
        };
        let key = GemmKey {
            m,
            n,
            k,
            batch,
            b_transposed,
            operands: DType::BF16,
            out,
            epilogue,
            bias: bias.map(|_| out),
            align_a: pointer_alignment(pa),
            align_b: pointer_alignment(pb),
            align_d: pointer_alignment(pd),
        };
        let cell = self.lt()?;
        guarded("cuBLASLt matmul", || {
            stream
                .context()
                .bind_to_thread()
                .map_err(|e| driver_err("binding the context", e))?;
            // Poisoning only means a panic happened while holding the lock; the plans are intact
            // (a half-built plan is never inserted).
            let mut st = cell.lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *st;
            if !st.plans.contains_key(&key) {
                let plan = Plan::new(st.handle, &key, pbias)?;
                st.plans.insert(key, plan);
            }
            let plan = st
                .plans
                .get(&key)
                .ok_or_else(|| backend_err("gemm plan cache"))?;
            if let Some(p) = pbias {
                // BIAS_POINTER is a `void*`; cuBLASLt reads descriptors when the call is queued,
                // so setting it on the shared cached descriptor per call is safe under the lock.
                // SAFETY: live descriptor, pointer-sized value.
                unsafe {
                    set_desc(
                        plan.desc,
                        ltsys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                        &p,
                    )
                }
                .map_err(|e| lt_err("BIAS_POINTER", &key, e))?;
            }
            let (pw, _sync) = st.workspace.device_ptr(stream);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: every pointer was range-checked above and lives on this device; the
            // layouts describe exactly those ranges (see the module docs); alpha/beta are host
            // f32 (scale type f32, default host pointer mode); C = D with beta = 0 (not read).
            unsafe {
                lt::matmul(
                    st.handle,
                    plan.desc,
                    (&alpha as *const f32).cast::<c_void>(),
                    (&beta as *const f32).cast::<c_void>(),
                    pb as *const c_void,
                    plan.layout_a,
                    pa as *const c_void,
                    plan.layout_b,
                    pd as *const c_void,
                    plan.layout_d,
                    pd as *mut c_void,
                    plan.layout_d,
                    &plan.algo,
                    pw as *mut c_void,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as ltsys::cudaStream_t,
                )
            }
            .map_err(|e| lt_err("cublasLtMatmul", &key, e))
        })
    }

    /// Device address of the first of `len` elements of a contiguous device tensor.
    fn gemm_addr(&self, op: &'static str, t: &Tensor, len: usize) -> Result<u64> {
        let buf = gemm_buffer(op, t)?;
        let es = t.dtype().size_in_bytes();
        if t.numel() < len {
            return Err(Error::shape(
                op,
                format!("{t:?} holds fewer than {len} elements"),
            ));
        }
        let view = buf
            .view::<u8>(t.offset() * es, len * es)
            .ok_or_else(|| backend_err(format!("{op}: tensor {t:?} exceeds its device buffer")))?;
        let (p, _sync) = view.device_ptr(self.stream());
        Ok(p)
    }
}

fn gemm_buffer<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a DeviceBuffer> {
    match t.storage() {
        Storage::Device(b) => Ok(b),
        Storage::Host(_) => Err(backend_err(format!(
            "{op}: tensor {t:?} is on the host; copy it with to_device first"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(pointer_alignment(0x7f00_0000_0000), 256);
        assert_eq!(pointer_alignment(0x7f00_0000_0100), 256);
        assert_eq!(pointer_alignment(0x7f00_0000_0080), 128);
        assert_eq!(pointer_alignment(0x7f00_0000_0002), 2);
        assert_eq!(pointer_alignment(0x7f00_0000_0006), 2);
        assert_eq!(pointer_alignment(0x7f00_0000_0010), 16);
    }

    #[test]
    fn keys_differ_in_every_field_that_changes_the_plan() {
        let base = GemmKey {
            m: 64,
            n: 3072,
            k: 1024,
            batch: 1,
            b_transposed: true,
            operands: DType::BF16,
            out: DType::BF16,
            epilogue: Epilogue::None,
            bias: None,
            align_a: 256,
            align_b: 256,
            align_d: 256,
        };
        let variants = [
            base,
            GemmKey { m: 65, ..base },
            GemmKey { n: 3073, ..base },
            GemmKey { k: 1023, ..base },
            GemmKey { batch: 2, ..base },
            GemmKey {
                b_transposed: false,
                ..base
            },
            GemmKey {
                out: DType::F32,
                ..base
            },
            GemmKey {
                epilogue: Epilogue::GeluTanh,
                ..base
            },
            GemmKey {
                epilogue: Epilogue::Relu,
                ..base
            },
            GemmKey {
                bias: Some(DType::BF16),
                ..base
            },
            GemmKey {
                bias: Some(DType::F32),
                ..base
            },
            GemmKey { align_a: 2, ..base },
            GemmKey { align_b: 2, ..base },
            GemmKey {
                align_d: 16,
                ..base
            },
        ];
        let set: HashSet<GemmKey> = variants.iter().copied().collect();
        assert_eq!(set.len(), variants.len());
        assert!(set.contains(&base));
    }

    #[test]
    fn epilogues_map_to_cublaslt_with_and_without_bias() {
        use ltsys::cublasLtEpilogue_t as E;
        assert_eq!(
            lt_epilogue(Epilogue::None, false),
            E::CUBLASLT_EPILOGUE_DEFAULT
        );
        assert_eq!(lt_epilogue(Epilogue::None, true), E::CUBLASLT_EPILOGUE_BIAS);
        assert_eq!(
            lt_epilogue(Epilogue::GeluTanh, true),
            E::CUBLASLT_EPILOGUE_GELU_BIAS
        );
        assert_eq!(
            lt_epilogue(Epilogue::Relu, false),
            E::CUBLASLT_EPILOGUE_RELU
        );
        assert_eq!(
            lt_epilogue(Epilogue::Relu, true),
            E::CUBLASLT_EPILOGUE_RELU_BIAS
        );
    }
}
