//! Layer-by-layer capture of the inputs of every projection group over the calibration
//! blocks. Only the current layer's weights are resident: each layer is read from the
//! memory-mapped checkpoint when its turn comes and its pages are released afterwards, so a
//! model much larger than RAM streams through.

use checkpoint::names::{self, Projection};
use checkpoint::{Checkpoint, ModelConfig};
use tp_runtime::load::{WeightSource, read_vocab_rows};
use tp_runtime::model::{DecoderLayer, ForwardContext, Workspace, embed_scaled};
use tp_runtime::{Backend, Compute, HostTensor, SeqLayout};

use crate::{Activations, CalibError, Result};

/// Tokens per forward pass while capturing: bounds the transient MLP activations.
const TOKENS_PER_CHUNK: usize = 4096;

/// The inputs of one decoder layer's projection groups over every calibration token, in host
/// memory (the scale and clip searches read them there, whatever backend ran the layer), in
/// the precision the search computes in ([`Activations`]).
#[derive(Clone, Debug)]
pub struct LayerInputs {
    /// Input of q/k/v (the normed residual), `[tokens, hidden]`.
    pub attn: Activations,
    /// Input of o_proj (attention output), `[tokens, q_features]`.
    pub o: Activations,
    /// Input of gate/up (the normed residual), `[tokens, hidden]`.
    pub mlp: Activations,
    /// Input of down_proj (`activation(gate) * up`), `[tokens, intermediate]`.
    pub down: Activations,
}

impl LayerInputs {
    /// The captured input of projection `p`.
    pub fn of(&self, p: Projection) -> &Activations {
        match p {
            Projection::Q | Projection::K | Projection::V => &self.attn,
            Projection::O => &self.o,
            Projection::Gate | Projection::Up => &self.mlp,
            Projection::Down => &self.down,
        }
    }

    /// Mutable access to the captured input of projection `p`.
    pub fn of_mut(&mut self, p: Projection) -> &mut Activations {
        match p {
            Projection::Q | Projection::K | Projection::V => &mut self.attn,
            Projection::O => &mut self.o,
            Projection::Gate | Projection::Up => &mut self.mlp,
            Projection::Down => &mut self.down,
        }
    }

    /// Bytes held by the four inputs.
    pub fn bytes(&self) -> usize {
        [&self.attn, &self.o, &self.mlp, &self.down]
            .iter()
            .map(|a| a.bytes())
            .sum()
    }
}

fn check_finite(x: &Activations, layer: usize, what: &'static str) -> Result<()> {
    let cols = x.cols();
    match x.first_non_finite() {
        None => Ok(()),
        Some(i) => Err(CalibError::NonFinite {
            layer,
            what,
            row: i / cols,
            channel: i % cols,
        }),
    }
}

/// One layer, loaded, with its captured inputs.
pub struct LayerCapture<B: Backend> {
    pub index: usize,
    /// The unmodified layer (weights borrowed from the mapped checkpoint where the backend
    /// allows).
    pub layer: DecoderLayer<B>,
    pub inputs: LayerInputs,
}

/// Streams a checkpoint's decoder layers over the calibration blocks, on backend `B`.
pub struct LayerStream<'a, B: Backend> {
    checkpoint: &'a Checkpoint,
    config: &'a ModelConfig,
    backend: &'a B,
    /// Residual stream entering the next layer, `[tokens, hidden]`, on the host: the output
    /// of the previous layer with its original (unquantized) weights. Each chunk of it is
    /// handed to the backend in turn, and its output written back in place.
    x: HostTensor,
    tokens: usize,
    seq_len: usize,
    next: usize,
    /// How the captured inputs are stored: as the search's products read them.
    storage: Compute,
}

impl<'a, B: Backend> LayerStream<'a, B> {
    /// Embeds the calibration blocks (all of length `seq_len`); the layers' captured inputs
    /// will be stored for a search computing in `compute` (see [`Activations`]).
    pub fn new(
        backend: &'a B,
        checkpoint: &'a Checkpoint,
        config: &'a ModelConfig,
        blocks: &[Vec<u32>],
        compute: Compute,
    ) -> Result<Self> {
        let seq_len = blocks.first().map_or(0, Vec::len);
        if seq_len == 0 || blocks.iter().any(|b| b.len() != seq_len) {
            return Err(CalibError::Invalid(
                "calibration blocks must be non-empty and of equal length".into(),
            ));
        }
        let ids: Vec<u32> = blocks.concat();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= config.vocab_size) {
            return Err(CalibError::Invalid(format!(
                "the tokenizer produced id {id}, outside the model's vocabulary of {}",
                config.vocab_size
            )));
        }
        let whole = tp_runtime::shard::RankShard::whole(config);
        let table = backend.matrix(read_vocab_rows(
            WeightSource::Full(checkpoint),
            names::EMBED_TOKENS,
            config,
            &whole,
        )?)?;
        let embedded = embed_scaled(backend, config, &table, &ids, 0)?;
        let x = HostTensor::new(backend.download(&embedded)?, ids.len(), config.hidden_size)?;
        drop((table, embedded));
        checkpoint.tensor(names::EMBED_TOKENS)?.release_pages();
        Ok(LayerStream {
            checkpoint,
            config,
            backend,
            x,
            tokens: ids.len(),
            seq_len,
            next: 0,
            storage: compute,
        })
    }

    /// Calibration tokens.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Index of the layer [`LayerStream::next_layer`] will return.
    pub fn next_index(&self) -> usize {
        self.next
    }

    /// The residual stream entering the next layer.
    pub fn residual(&self) -> &HostTensor {
        &self.x
    }

    /// Loads the next layer, runs it over every block while capturing its projection inputs,
    /// and advances the residual stream to its (unquantized) output. `None` after the last.
    pub fn next_layer(&mut self) -> Result<Option<LayerCapture<B>>> {
        let index = self.next;
        if index == self.config.num_hidden_layers {
            return Ok(None);
        }
        let (c, storage, tokens) = (self.config, self.storage, self.tokens);
        let mut inputs = LayerInputs {
            attn: Activations::zeros(tokens, c.hidden_size, storage),
            o: Activations::zeros(tokens, c.q_features(), storage),
            mlp: Activations::zeros(tokens, c.hidden_size, storage),
            down: Activations::zeros(tokens, c.intermediate_size, storage),
        };
        let backend = self.backend;
        let layer = self.advance(&mut |start, rows, p, t| {
            let dst = inputs.of_mut(p);
            let cols = dst.cols();
            backend.read(t, |values| dst.write_rows(start, &values[..rows * cols]))
        })?;
        check_finite(&inputs.attn, index, "q/k/v")?;
        check_finite(&inputs.o, index, "o_proj")?;
        check_finite(&inputs.mlp, index, "gate/up")?;
        check_finite(&inputs.down, index, "down_proj")?;
        Ok(Some(LayerCapture { index, layer, inputs }))
    }

    /// Runs the next layer over every block without capturing anything (the layers before a
    /// part's range): the residual stream advances exactly as [`LayerStream::next_layer`]
    /// advances it, without the inputs' memory (two bytes per token per channel of each
    /// group). `false` after the last layer.
    pub fn skip_layer(&mut self) -> Result<bool> {
        if self.next == self.config.num_hidden_layers {
            return Ok(false);
        }
        self.advance(&mut |_, _, _, _| Ok(()))?;
        Ok(true)
    }

    /// Loads the next layer and runs it over every block in chunks, showing `tap` each
    /// chunk's projection inputs (first row, rows, group, values); the residual stream
    /// becomes the layer's output.
    fn advance(&mut self, tap: &mut ChunkTap<'_, B::Tensor>) -> Result<DecoderLayer<B>> {
        let index = self.next;
        let (c, backend) = (self.config, self.backend);
        let layer = DecoderLayer::load(backend, self.checkpoint, c, index)?;
        let tokens = self.tokens;
        let blocks_per_chunk = (TOKENS_PER_CHUNK / self.seq_len).max(1);
        let chunk_rows = blocks_per_chunk * self.seq_len;
        let hidden = c.hidden_size;
        let mut ws = Workspace::default();
        let mut ctx: Option<(usize, ForwardContext<B>)> = None;
        for start in (0..tokens).step_by(chunk_rows) {
            let rows = chunk_rows.min(tokens - start);
            if ctx.as_ref().is_none_or(|(r, _)| *r != rows) {
                let layout = SeqLayout::new(&vec![self.seq_len; rows / self.seq_len])?;
                ctx = Some((rows, ForwardContext::new(backend, c, &layout)?));
            }
            let (_, ctx) = ctx.as_ref().expect("set above");
            let rows_range = start..start + rows;
            let mut x = backend.upload(self.x.rows_slice(rows_range.clone()), rows, hidden)?;
            layer.forward_tapped(backend, &mut x, ctx, &mut ws, &mut |p, t| tap(start, rows, p, t))?;
            let residual = self.x.rows_slice_mut(rows_range);
            backend.read(&x, |values| residual.copy_from_slice(values))?;
        }
        if let Some(i) = self.x.data.iter().position(|v| !v.is_finite()) {
            return Err(CalibError::NonFinite {
                layer: index,
                what: "the next layer",
                row: i / hidden,
                channel: i % hidden,
            });
        }
        self.next += 1;
        Ok(layer)
    }

    /// Drops layer `index`'s weights from resident memory once the caller is done with it.
    pub fn release(&self, index: usize) {
        self.checkpoint
            .release_prefix(&names::layer_tensor_name(index, ""));
    }
}

/// What [`LayerStream`]'s forward shows each chunk's projection inputs to: (first row, rows,
/// group, values).
type ChunkTap<'a, T> = dyn FnMut(usize, usize, Projection, &T) -> tp_runtime::Result<()> + 'a;

#[cfg(test)]
mod tests {
    use super::*;
    use tp_runtime::CpuBackend;

    #[test]
    fn capture_matches_full_forward_on_tiny_llama() {
        let tiny = testkit::tiny("tiny-llama");
        let dir = tiny.dir.clone();
        let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let blocks: Vec<Vec<u32>> = (0..3)
            .map(|b| (0..40).map(|i| (i * 7 + b * 13) % 512).collect())
            .collect();
        let backend = CpuBackend::new();
        let mut stream = LayerStream::new(&backend, &checkpoint, &config, &blocks, Compute::F32).unwrap();
        let mut captures = 0;
        while let Some(cap) = stream.next_layer().unwrap() {
            assert_eq!(cap.inputs.down.cols(), config.intermediate_size);
            assert_eq!(cap.inputs.attn.rows(), 120);
            stream.release(cap.index);
            captures += 1;
        }
        assert_eq!(captures, config.num_hidden_layers);
        // The residual stream after the last layer equals the model's own forward pass.
        let model = tp_runtime::Model::load(&dir, CpuBackend::new()).unwrap();
        let layout = SeqLayout::new(&[40, 40, 40]).unwrap();
        let ctx = model.context(&layout).unwrap();
        let mut ws = Workspace::default();
        let mut x = model.embed(&blocks.concat()).unwrap();
        for layer in model.layers() {
            layer
                .forward(model.backend(), &mut x, &ctx, &mut ws, None)
                .unwrap();
        }
        assert_eq!(x.data, stream.residual().data);
    }

    /// Skipping a layer leaves the stream where capturing it does: the next layer's inputs
    /// and the residual stream are the same bits.
    #[test]
    fn skipping_a_layer_advances_as_capturing_does() {
        let tiny = testkit::tiny("tiny-llama");
        let config = ModelConfig::from_file(&tiny.dir.join("config.json")).unwrap();
        let checkpoint = Checkpoint::open(&tiny.dir).unwrap();
        let blocks: Vec<Vec<u32>> = (0..2)
            .map(|b| (0..48).map(|i| (i * 5 + b * 11) % 512).collect())
            .collect();
        let backend = CpuBackend::new();
        let stream = || LayerStream::new(&backend, &checkpoint, &config, &blocks, Compute::F32).unwrap();
        let (mut captured, mut skipped) = (stream(), stream());
        captured.next_layer().unwrap().unwrap();
        assert!(skipped.skip_layer().unwrap());
        assert_eq!(captured.residual().data, skipped.residual().data);
        let (a, b) = (
            captured.next_layer().unwrap().unwrap(),
            skipped.next_layer().unwrap().unwrap(),
        );
        assert_eq!((a.index, b.index), (1, 1));
        for p in [Projection::Q, Projection::O, Projection::Gate, Projection::Down] {
            assert_eq!(
                a.inputs.of(p).rows_f32(0..96),
                b.inputs.of(p).rows_f32(0..96),
                "{p:?}"
            );
        }
        while skipped.skip_layer().unwrap() {}
        assert_eq!(skipped.next_index(), config.num_hidden_layers);
        assert!(skipped.next_layer().unwrap().is_none());
    }
}
