//! Per-table row rules: the row layout, the missing-key policy and the server-side optimizer.
//!
//! A row in a table is `value bytes (dtype-encoded) | optimizer state (f32 LE words)`. The
//! optimizer state lives in the layout's extra bytes:
//! - `sgd`: none;
//! - `adagrad`: `dim` accumulators, initialised to `initial_accumulator`;
//! - `adam`: `dim` first moments, `dim` second moments, then the step count as f32.
//!
//! Rows that come from the repository (full versions, deltas) carry no optimizer state: their
//! state starts fresh, as the training job that wrote them already consumed its gradients.

use hopps_format::{MissingPolicy, OptimizerSpec, TableSpec};
use hopps_table::{Dtype, RowLayout};

use crate::error::{EngineError, Result};

/// The optimizer of a table, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Optimizer {
    Sgd { lr: f32 },
    Adagrad { lr: f32, eps: f32, init: f32 },
    Adam { lr: f32, b1: f32, b2: f32, eps: f32 },
}

impl Optimizer {
    fn from_spec(model: &str, table: &str, spec: &OptimizerSpec) -> Result<Optimizer> {
        let lr = spec.learning_rate;
        let eps = if spec.epsilon > 0.0 {
            spec.epsilon
        } else {
            1e-8
        };
        if !(lr.is_finite() && lr > 0.0) {
            return Err(EngineError::invalid(format!(
                "model {model} table {table}: optimizer learning_rate {lr} must be a positive number; \
                 fix model.json"
            )));
        }
        match spec.kind.as_str() {
            "sgd" => Ok(Optimizer::Sgd { lr }),
            "adagrad" => Ok(Optimizer::Adagrad {
                lr,
                eps,
                init: spec.initial_accumulator,
            }),
            "adam" => Ok(Optimizer::Adam {
                lr,
                b1: if spec.beta1 > 0.0 { spec.beta1 } else { 0.9 },
                b2: if spec.beta2 > 0.0 { spec.beta2 } else { 0.999 },
                eps,
            }),
            other => Err(EngineError::invalid(format!(
                "model {model} table {table}: unknown optimizer {other:?}; use sgd, adagrad or adam \
                 in model.json"
            ))),
        }
    }

    fn state_floats(&self, dim: usize) -> usize {
        match self {
            Optimizer::Sgd { .. } => 0,
            Optimizer::Adagrad { .. } => dim,
            Optimizer::Adam { .. } => 2 * dim + 1,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adagrad { .. } => "adagrad",
            Optimizer::Adam { .. } => "adam",
        }
    }
}

/// Everything the engine needs to know about one table to encode, decode and update rows.
#[derive(Debug, Clone)]
pub(crate) struct TableShape {
    pub name: String,
    pub dim: usize,
    pub layout: RowLayout,
    pub row_bytes: usize,
    pub value_bytes: usize,
    pub dtype: String,
    pub missing: MissingPolicy,
    pub optimizer: Option<Optimizer>,
}

impl TableShape {
    pub(crate) fn new(model: &str, spec: &TableSpec) -> Result<TableShape> {
        let dtype = Dtype::parse(&spec.dtype).ok_or_else(|| {
            EngineError::invalid(format!(
                "model {model} table {}: unknown dtype {:?}; use f32, f16, bf16 or int8",
                spec.name, spec.dtype
            ))
        })?;
        if spec.dim == 0 {
            return Err(EngineError::invalid(format!(
                "model {model} table {}: dim is 0; fix model.json",
                spec.name
            )));
        }
        let optimizer = spec
            .optimizer
            .as_ref()
            .map(|o| Optimizer::from_spec(model, &spec.name, o))
            .transpose()?;
        let dim = spec.dim as usize;
        let extra = optimizer.map(|o| o.state_floats(dim) * 4).unwrap_or(0);
        let layout = RowLayout::new(spec.dim, dtype, extra as u32);
        Ok(TableShape {
            name: spec.name.clone(),
            dim,
            layout,
            row_bytes: layout.row_bytes(),
            value_bytes: layout.value_bytes(),
            dtype: dtype.as_str().to_string(),
            missing: spec.missing,
            optimizer,
        })
    }

    pub(crate) fn missing_name(&self) -> &'static str {
        match self.missing {
            MissingPolicy::Zeros => "zeros",
            MissingPolicy::Error => "error",
            MissingPolicy::Random { .. } => "random",
        }
    }

    /// Writes `values` and a fresh optimizer state into `row` (`row_bytes` long).
    pub(crate) fn encode_fresh(&self, values: &[f32], row: &mut [u8]) {
        self.layout.encode(values, &mut row[..self.value_bytes]);
        self.init_state(&mut row[self.value_bytes..]);
    }

    fn init_state(&self, state: &mut [u8]) {
        let init = match self.optimizer {
            Some(Optimizer::Adagrad { init, .. }) => init,
            _ => 0.0,
        };
        for w in state.chunks_exact_mut(4) {
            w.copy_from_slice(&init.to_le_bytes());
        }
    }

    /// The row of a key that is not in the table, per the missing-key policy (zeros for
    /// `error`, whose callers report the key instead of using the row).
    pub(crate) fn fill_missing(&self, key: u64, out: &mut [f32]) {
        match self.missing {
            MissingPolicy::Zeros | MissingPolicy::Error => out.fill(0.0),
            MissingPolicy::Random { seed, scale } => random_init(seed, scale, key, out),
        }
    }

    /// Applies one gradient to `row` (values and optimizer state) with the table's optimizer.
    /// `scratch` holds at least `dim` floats.
    pub(crate) fn apply_gradient(
        &self,
        row: &mut [u8],
        grad: &[f32],
        scratch: &mut [f32],
    ) -> Result<()> {
        let Some(opt) = self.optimizer else {
            return Err(EngineError::precondition(format!(
                "table {} has no optimizer; set one in model.json to accept pushes, or use upsert",
                self.name
            )));
        };
        let dim = self.dim;
        let w = &mut scratch[..dim];
        self.layout.decode(&row[..self.value_bytes], w);
        let state = &mut row[self.value_bytes..];
        match opt {
            Optimizer::Sgd { lr } => {
                for (wi, gi) in w.iter_mut().zip(grad) {
                    *wi -= lr * gi;
                }
            }
            Optimizer::Adagrad { lr, eps, .. } => {
                for (i, (wi, gi)) in w.iter_mut().zip(grad).enumerate() {
                    let acc = read_f32(state, i) + gi * gi;
                    write_f32(state, i, acc);
                    *wi -= lr * gi / (acc.sqrt() + eps);
                }
            }
            Optimizer::Adam { lr, b1, b2, eps } => {
                let t = read_f32(state, 2 * dim) + 1.0;
                write_f32(state, 2 * dim, t);
                let c1 = 1.0 - b1.powf(t);
                let c2 = 1.0 - b2.powf(t);
                for (i, (wi, gi)) in w.iter_mut().zip(grad).enumerate() {
                    let m = b1 * read_f32(state, i) + (1.0 - b1) * gi;
                    let v = b2 * read_f32(state, dim + i) + (1.0 - b2) * gi * gi;
                    write_f32(state, i, m);
                    write_f32(state, dim + i, v);
                    *wi -= lr * (m / c1) / ((v / c2).sqrt() + eps);
                }
            }
        }
        self.layout.encode(w, &mut row[..self.value_bytes]);
        Ok(())
    }
}

fn read_f32(b: &[u8], i: usize) -> f32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i * 4..i * 4 + 4]);
    f32::from_le_bytes(w)
}

fn write_f32(b: &mut [u8], i: usize, v: f32) {
    b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic per-key initial row: value `j` is uniform in `[-scale, scale)`, from
/// `splitmix64(splitmix64(seed ^ splitmix64(key)) + j)`. Every node and every client library
/// computes the same row for the same (seed, key).
pub fn random_init(seed: u64, scale: f32, key: u64, out: &mut [f32]) {
    let base = splitmix64(seed ^ splitmix64(key));
    for (j, o) in out.iter_mut().enumerate() {
        let r = splitmix64(base.wrapping_add(j as u64));
        // 24 random bits give every representable step of an f32 in [0, 1).
        let u = (r >> 40) as f32 / (1u64 << 24) as f32;
        *o = (2.0 * u - 1.0) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(opt: Option<&str>) -> TableSpec {
        TableSpec {
            name: "t".into(),
            dim: 2,
            dtype: "f32".into(),
            missing: MissingPolicy::Random {
                seed: 7,
                scale: 0.5,
            },
            optimizer: opt.map(|k| OptimizerSpec {
                kind: k.into(),
                learning_rate: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                epsilon: 1e-8,
                initial_accumulator: 0.1,
            }),
        }
    }

    #[test]
    fn random_init_is_deterministic_and_bounded() {
        let mut a = [0f32; 8];
        let mut b = [0f32; 8];
        random_init(1, 0.25, 42, &mut a);
        random_init(1, 0.25, 42, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        random_init(1, 0.25, 43, &mut b);
        assert_ne!(a, b);
    }

    #[test]
    fn sgd_adagrad_adam_follow_their_formulas() {
        let mut scratch = [0f32; 2];
        for (kind, expect0) in [
            ("sgd", 1.0 - 0.1 * 0.5),
            // acc = 0.1 + 0.25; w -= 0.1 * 0.5 / sqrt(0.35)
            ("adagrad", 1.0 - 0.1 * 0.5 / (0.35f32.sqrt() + 1e-8)),
            // first Adam step moves by lr * sign(g) (bias-corrected m/sqrt(v) = 1)
            ("adam", 1.0 - 0.1),
        ] {
            let shape = TableShape::new("m", &spec(Some(kind))).unwrap();
            let mut row = vec![0u8; shape.row_bytes];
            shape.encode_fresh(&[1.0, 2.0], &mut row);
            shape
                .apply_gradient(&mut row, &[0.5, 0.0], &mut scratch)
                .unwrap();
            let mut w = [0f32; 2];
            shape.layout.decode(&row[..shape.value_bytes], &mut w);
            assert!(
                (w[0] - expect0).abs() < 1e-5,
                "{kind}: {} vs {expect0}",
                w[0]
            );
            assert_eq!(w[1], 2.0, "{kind}: a zero gradient leaves the value");
        }
    }

    #[test]
    fn push_without_optimizer_is_refused() {
        let shape = TableShape::new("m", &spec(None)).unwrap();
        let mut row = vec![0u8; shape.row_bytes];
        let err = shape
            .apply_gradient(&mut row, &[1.0, 1.0], &mut [0.0; 2])
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
        let bad = TableShape::new("m", &spec(Some("lamb"))).unwrap_err();
        assert!(bad.to_string().contains("lamb"));
    }
}
