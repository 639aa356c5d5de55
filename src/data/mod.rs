//! The data types: what goes into a backend and what comes out, with the checks that make a
//! value of each type consistent. No computation lives here, and nothing here imports a module
//! above it (only `error` and `params`), so every other module can take these types.

pub(crate) mod batch;
pub(crate) mod layout;
pub(crate) mod logits;
pub(crate) mod output;

pub use batch::{Batch, HiddenBatch, HiddenInputs, HiddenTensors, OwnedBatch, OwnedHiddenBatch};
pub use layout::{
    BatchLayout, GroupLayout, Layout, LayoutBuilder, Padding, Trajectories, TrajectoryBuf, TurnBuf, Turns,
};
pub use logits::{Dtype, Elements, LogitBuf, LogitData, LogitElement, Logits};
pub use output::{Advantages, Output, RowOutputs};
