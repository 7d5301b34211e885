//! The Hub (issue 15): signed, content-addressed packages.
//!
//! What it holds:
//! - `package.rs` a package's manifest (the seed's `beemesh.yaml` shape plus the artifacts it
//!   carries and the workload it deploys), checked with a path for every problem;
//! - `attest.rs` attestations: DSSE envelopes (PAE, threshold of trusted keys, the payload type
//!   asked for) and the in-toto Statements they carry, whose subjects must be the package's
//!   artifacts by digest;
//! - `digest.rs` content addressing (SHA-256, `sha256:<hex>`), streamed and bounded;
//! - `osv.rs` the vulnerability scan: an SBOM's components against OSV's zip exports or a
//!   directory of OSV records, offline (SEMVER and ECOSYSTEM ranges, listed versions);
//! - `pack.rs` packing a package directory: every file it names hashed into the store (inside
//!   the directory, within limits), then its index — the package's identity — stored last;
//! - `sbom.rs` SBOMs (SPDX 2.x and CycloneDX 1.x JSON): their components with package URLs, and
//!   the check that every artifact is described by its SHA-256;
//! - `store.rs` blobs by digest behind one trait (`BlobStore`), on the filesystem (`FsStore`):
//!   nothing half-visible, bounded uploads, verified reads.
//! - `s3.rs` blobs in an S3-compatible object store (`S3Store`, feature `s3`), and its
//!   settings (`S3Config`, always: a node without the feature refuses them, saying so);
//! - `submit.rs` the submission pipeline's first gate: capabilities within what the publisher
//!   may grant, the workload within the largest plan, no secret written into the manifest.
//! - `tuf.rs` the TUF repository (through `tough`): the Hub's writer (root with rotation, a
//!   delegation per publisher for `org/*`, snapshot, timestamp; in the layout python-tuf's
//!   `ngclient` also reads) and the verifying client every node runs, over any `Source`;
//! - `review.rs` the review every party shares; `prepare.rs` `macula hub attest`;
//! - `bundle.rs` offline bundles (`.bmz`): the TUF chain, the packages' files and the signed
//!   vulnerability data, verified whole before anything is usable.
//!
//! The Hub's service (publishers, publishing, tiers, status) is in `macula-registry/src/hub/`;
//! the nodes' client in `macula-node/src/workloads/packages.rs` (see `docs/design/hub.md`).

pub mod attest;
pub mod bundle;
pub mod digest;
pub mod osv;
pub mod pack;
pub mod package;
pub mod prepare;
pub mod review;
pub mod s3;
pub mod sbom;
pub mod store;
pub mod submit;
pub mod tuf;

pub use digest::Digest;
pub use package::{parse, FieldError, Package};
pub use store::{BlobStore, FsStore, StoreError};
