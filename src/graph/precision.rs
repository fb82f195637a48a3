//! The weights' precision (`--weights`): what `weights` reads them as and
//! what `quant` makes of them, below both.

/// Precision of the weights (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// float32 as read (float16 or bfloat16 checkpoints are widened).
    Fp32,
    /// int8 per output channel for every layer's MatMuls and the LM head.
    Int8,
    /// int8 for every layer's MatMuls, the LM head left in float32.
    #[value(name = "int8-fp32-head")]
    Int8Fp32Head,
}

impl Precision {
    /// `BATCHGEN_WEIGHTS` as `serve --weights` reads it, float32 when unset
    /// (for the benchmark programs, which take no flags).
    pub fn from_env() -> Result<Self, String> {
        from_env("BATCHGEN_WEIGHTS", Precision::Fp32)
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Int8Fp32Head => "int8-fp32-head",
        }
    }
}

/// The range of the int8 weights (`--int8-range`): what the CPU's integer
/// kernels can add without saturating (see `quant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Int8Range {
    /// Full (-127..=127) on a CPU with VNNI, reduced without it.
    Auto,
    /// -127..=127: exact on VNNI (and ARM) kernels; without VNNI, ONNX
    /// Runtime's `vpmaddubsw` kernels saturate.
    Full,
    /// -63..=63 (ONNX Runtime's `reduce_range`): one bit less precision,
    /// never saturating.
    Reduced,
}

/// The largest magnitude the int8 weights take on this CPU (see `quant`'s
/// module docs): 127 with VNNI, 63 without.
pub fn weight_limit() -> i8 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni") {
            127
        } else {
            63
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // ARM's kernels (sdot, smmla) and the portable one widen before adding.
        127
    }
}

/// A flag's value from its environment variable, `default` when unset.
fn from_env<T: clap::ValueEnum>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => T::from_str(&v, true).map_err(|e| format!("{name}: {e}")),
        Err(_) => Ok(default),
    }
}

impl Int8Range {
    /// `BATCHGEN_INT8_RANGE` as `serve --int8-range` reads it, `auto` when
    /// unset (for the benchmark programs).
    pub fn from_env() -> Result<Self, String> {
        from_env("BATCHGEN_INT8_RANGE", Int8Range::Auto)
    }

    /// The largest weight magnitude.
    pub fn limit(self) -> i8 {
        match self {
            Int8Range::Auto => weight_limit(),
            Int8Range::Full => 127,
            Int8Range::Reduced => 63,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Int8Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Int8Range::Auto => "auto",
            Int8Range::Full => "full",
            Int8Range::Reduced => "reduced",
        })
    }
}
