//! [`Verdicts`]: what a stage made of a batch of messages, in flat vectors a worker reuses.

use std::ops::Range;

use crate::lift::{Lifted, LiftedBatch};
use crate::{Output, RuleError};

/// The results of a batch of messages ([`Stage::call_batch_into`](crate::Stage::call_batch_into)):
/// for each message, in order, its outputs (borrowed, see [`OutputRef`]) or why not. Outputs
/// live in a few flat vectors, not a vector per message and per payload; a caller keeps one
/// `Verdicts` and [`clear`](Verdicts::clear)s it between batches.
#[derive(Debug, Default)]
pub struct Verdicts {
    slots: Vec<Slot>,
    outputs: Vec<Span>,
    bytes: Vec<u8>,
    errors: Vec<RuleError>,
}

#[derive(Debug)]
enum Slot {
    /// A range of `outputs`.
    Outputs(Range<usize>),
    /// An index in `errors`.
    Failed(usize),
}

/// An output: ranges of `bytes`; `topic` is valid UTF-8.
#[derive(Debug)]
struct Span {
    topic: Option<Range<usize>>,
    payload: Range<usize>,
}

/// Bytes of room each vector keeps over [`Verdicts::clear`].
const KEEP: usize = 256 << 10;

/// One output of a rule: `topic: None` keeps the input's topic; QoS, retain and properties are
/// the input's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputRef<'a> {
    pub topic: Option<&'a str>,
    pub payload: &'a [u8],
}

impl OutputRef<'_> {
    /// As an owned [`Output`].
    pub fn to_output(&self) -> Output {
        Output {
            topic: self.topic.map(str::to_owned),
            payload: self.payload.to_vec(),
        }
    }
}

impl Verdicts {
    /// Messages with a verdict.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Forgets every verdict, keeping the room a usual batch needs (not what a burst of
    /// large outputs left).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.outputs.clear();
        self.bytes.clear();
        self.errors.clear();
        self.slots.shrink_to(KEEP / size_of::<Slot>());
        self.outputs.shrink_to(KEEP / size_of::<Span>());
        self.bytes.shrink_to(KEEP);
    }

    /// Message `index`'s outputs, in order (none: the message was dropped), or why not.
    pub fn get(&self, index: usize) -> Option<Result<Outputs<'_>, &RuleError>> {
        Some(match self.slots.get(index)? {
            Slot::Outputs(range) => Ok(Outputs {
                spans: self.outputs[range.clone()].iter(),
                bytes: &self.bytes,
            }),
            Slot::Failed(i) => Err(&self.errors[*i]),
        })
    }

    /// Every message's verdict, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Result<Outputs<'_>, &RuleError>> {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    /// As owned values, in order.
    pub fn into_results(self) -> Vec<Result<Vec<Output>, RuleError>> {
        let mut errors: Vec<Option<RuleError>> = self.errors.into_iter().map(Some).collect();
        self.slots
            .iter()
            .map(|slot| match slot {
                Slot::Outputs(range) => Ok(Outputs {
                    spans: self.outputs[range.clone()].iter(),
                    bytes: &self.bytes,
                }
                .map(|o| o.to_output())
                .collect()),
                Slot::Failed(i) => Err(errors[*i].take().expect("one slot per error")),
            })
            .collect()
    }

    /// Appends one message's verdict (from a call of its own).
    pub(crate) fn push(&mut self, result: Result<Vec<Output>, RuleError>) {
        match result {
            Ok(outputs) => {
                let first = self.outputs.len();
                for output in outputs {
                    let topic = output.topic.map(|t| self.push_bytes(t.as_bytes()));
                    let payload = self.push_bytes(&output.payload);
                    self.outputs.push(Span { topic, payload });
                }
                self.slots.push(Slot::Outputs(first..self.outputs.len()));
            }
            Err(error) => self.push_error(error),
        }
    }

    fn push_error(&mut self, error: RuleError) {
        self.slots.push(Slot::Failed(self.errors.len()));
        self.errors.push(error);
    }

    fn push_bytes(&mut self, bytes: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        start..self.bytes.len()
    }

    /// Appends a batch's verdicts. For message `i` of the batch, `too_many(i, count)` refuses
    /// its outputs when there are too many, and `error(i, message)` makes the plugin's error
    /// message the stage's error.
    pub(crate) fn push_batch(
        &mut self,
        batch: LiftedBatch,
        mut too_many: impl FnMut(usize, usize) -> Option<RuleError>,
        mut error: impl FnMut(usize, String) -> RuleError,
    ) {
        let LiftedBatch {
            results,
            outputs,
            bytes,
        } = batch;
        let output_base = self.outputs.len();
        let byte_base = self.bytes.len();
        let spare_bytes = if byte_base == 0 {
            // The usual case (one batch per call): take the bytes as they are.
            std::mem::replace(&mut self.bytes, bytes)
        } else {
            self.bytes.extend_from_slice(&bytes);
            bytes
        };
        let shift = |r: &Range<u32>| r.start as usize + byte_base..r.end as usize + byte_base;
        self.outputs.extend(outputs.iter().map(|span| Span {
            topic: span.topic.as_ref().map(shift),
            payload: shift(&span.payload),
        }));
        for (i, result) in results.iter().enumerate() {
            match result {
                Lifted::Outputs(range) => match too_many(i, (range.end - range.start) as usize) {
                    Some(refused) => self.push_error(refused),
                    None => self.slots.push(Slot::Outputs(
                        range.start as usize + output_base..range.end as usize + output_base,
                    )),
                },
                Lifted::Error(range) => {
                    let message = String::from_utf8_lossy(&self.bytes[shift(range)]).into_owned();
                    self.push_error(error(i, message));
                }
            }
        }
        LiftedBatch {
            results,
            outputs,
            bytes: spare_bytes,
        }
        .recycle();
    }
}

/// One message's outputs ([`Verdicts::get`]).
#[derive(Clone, Debug)]
pub struct Outputs<'a> {
    spans: std::slice::Iter<'a, Span>,
    bytes: &'a [u8],
}

impl<'a> Iterator for Outputs<'a> {
    type Item = OutputRef<'a>;

    fn next(&mut self) -> Option<OutputRef<'a>> {
        let span = self.spans.next()?;
        let bytes = self.bytes;
        let at = |r: &Range<usize>| &bytes[r.clone()];
        Some(OutputRef {
            topic: span
                .topic
                .as_ref()
                .map(|r| std::str::from_utf8(at(r)).expect("checked when lifted")),
            payload: at(&span.payload),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl ExactSizeIterator for Outputs<'_> {}
