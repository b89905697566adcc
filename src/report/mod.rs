//! DICOM result objects for PACS (SR, KOS, Secondary Capture).

mod object;
pub use object::{ResultObject, ResultObjectKind};
