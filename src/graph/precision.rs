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
        match std::env::var("BATCHGEN_WEIGHTS") {
            Ok(p) => <Self as clap::ValueEnum>::from_str(&p, true),
            Err(_) => Ok(Precision::Fp32),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Int8Fp32Head => "int8-fp32-head",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
