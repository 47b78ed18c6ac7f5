//! The shape of the dictionary being trained: its sizes, activation, kind and decoder norm.

use tiller_runtime::{Activation, Kind};

/// How the decoder rows' scale is held in check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderNorm {
    /// Rows renormalised to unit norm after every step, and the radial part of their gradient
    /// removed before it (Bricken et al. 2023; Gao et al. 2024).
    Unit,
    /// Rows free; ReLU's L1 term is weighted by their norms (Anthropic, April 2024). For the other
    /// activations, whose sparsity term does not read the norms, this leaves the rows free.
    Penalty,
}

impl DecoderNorm {
    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unit => "unit",
            Self::Penalty => "penalty",
        }
    }
}

impl std::str::FromStr for DecoderNorm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unit" => Ok(Self::Unit),
            "penalty" => Ok(Self::Penalty),
            other => Err(format!("`{other}` is not unit or penalty")),
        }
    }
}

/// The shape and kind of the dictionary.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    /// `sae`, `transcoder`, `skip_transcoder` or `crosscoder`.
    pub kind: Kind,
    /// `relu`, `topk`, `batchtopk` or `jumprelu`.
    pub activation: Activation,
    /// Width of one layer's input.
    pub d_in: usize,
    /// Width of one layer's output.
    pub d_out: usize,
    /// Layers (crosscoders; 1 otherwise).
    pub n_layers: usize,
    /// Number of features.
    pub d_sae: usize,
    /// TopK and BatchTopK: active features per token.
    pub k: usize,
    /// TopK and BatchTopK: dead latents the AuxK loss decodes per token.
    pub k_aux: usize,
    /// How the decoder's scale is held.
    pub decoder_norm: DecoderNorm,
    /// Whether `b_dec` is subtracted from the input before encoding.
    pub apply_b_dec_to_input: bool,
}

impl Arch {
    /// Width of the encoder's input, all layers together.
    pub fn width_in(&self) -> usize {
        self.in_blocks() * self.d_in
    }

    /// Width of the decoder's output, all layers together.
    pub fn width_out(&self) -> usize {
        self.out_blocks() * self.d_out
    }

    /// Layers read (crosscoders: `n_layers`).
    pub fn in_blocks(&self) -> usize {
        if self.kind == Kind::Crosscoder {
            self.n_layers
        } else {
            1
        }
    }

    /// Layers written (crosscoders: `n_layers`).
    pub fn out_blocks(&self) -> usize {
        self.in_blocks()
    }

    /// Whether the model has a skip connection `x W_skipᵀ`.
    pub fn has_skip(&self) -> bool {
        self.kind == Kind::SkipTranscoder
    }

    /// Whether the activation is TopK or BatchTopK (and so has the AuxK loss).
    pub fn is_topk(&self) -> bool {
        matches!(self.activation, Activation::TopK | Activation::BatchTopK)
    }
}
