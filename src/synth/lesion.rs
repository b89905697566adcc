//! What a fracture is, as a bone carries it: [`FractureKind`] and [`Fracture`] (plane,
//! gap, region, displacement, wedge), data only. [`super::fracture`] chooses and places
//! them on a bone; [`super::anatomy`] evaluates a bone with its fractures. Kept apart so
//! that those two modules do not import each other.

use serde::Serialize;

use super::geom::V3;
use super::shape::Group;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FractureKind {
    /// Lucent crack through the vertebral body, fragments in place.
    BodyCrack,
    /// Body crack with one fragment displaced by 1-4 mm.
    DisplacedBodyCrack,
    /// Anterior wedge compression (20-50 % anterior height loss).
    Compression,
    /// Crack through a lamina (posterior arch).
    LaminaCrack,
    /// Crack through the C1 ring (anterior or posterior arch), with a gap.
    C1RingCrack,
    /// Transverse gap at the base of the dens (C2).
    DensFracture,
}

#[derive(Debug, Clone)]
pub struct Fracture {
    pub kind: FractureKind,
    pub group: Group,
    /// Local point on the fracture plane.
    pub point: V3,
    /// Local unit normal of the plane; the displaced fragment is on its + side.
    pub normal: V3,
    /// Gap width along the normal (mm); 0 for compression.
    pub gap: f64,
    /// Only points within this distance of `point` are affected.
    pub region: f64,
    /// Local displacement of the + side fragment (mm).
    pub displacement: V3,
    /// Anterior height loss (fraction) for compression.
    pub wedge: f64,
}
