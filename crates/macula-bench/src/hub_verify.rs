//! Verifying packages as a node does before it installs one (goal ≤ 5 ms per package): a Hub
//! repository of `packages` packages from `publishers` publishers (each with a 64 KiB artifact,
//! an SPDX SBOM and signed SLSA provenance) is built; then a client refreshes its TUF metadata
//! (root, timestamp, snapshot, targets, every publisher's role) and verifies each package: its
//! index through TUF, then the review (manifest, files, grants, SBOM coverage, provenance DSSE
//! signature and subjects). Reported per package, and the refresh on its own.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use macula_hub::attest::Trusted;
use macula_hub::pack::{pack, Limits};
use macula_hub::review::{review, Rules};
use macula_hub::submit::Policy;
use macula_hub::tuf::{
    sign_next_role, Client, ClientOptions, Delegation, DirSource, Key, Lifetimes, Online, Repo,
};
use macula_hub::{BlobStore, FsStore};

use crate::Figure;

fn manifest(org: &str, i: usize) -> String {
    format!(
        "name: {org}/pkg{i}\nversion: 1.0.{i}\nkind: hub-package\npermissions:\n  planes: [workplane]\n  capabilities: [\"rpc:call:com.{org}.svc{i}\"]\n\
         artifacts:\n  - {{name: bin, file: bin/app}}\nattestations: {{sbom: sbom.spdx.json, provenance: provenance.dsse.json}}\n\
         workload: {{kind: payload, name: pkg{i}, command: [./bin/app]}}\n"
    )
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(packages: usize, publishers: usize) -> Result<Vec<Figure>> {
    let publishers = publishers.clamp(1, packages.max(1));
    let tmp = tempfile::tempdir()?;
    let store = FsStore::open(tmp.path().join("blobs"))?;
    let roots = [Key::generate()];
    let mut repo = Repo::create(
        &tmp.path().join("repo"),
        &roots,
        1,
        Online::generate(),
        Lifetimes::default(),
    )
    .await
    .map_err(|e| anyhow!("{e}"))?;
    let keys: Vec<(String, Key)> = (0..publishers)
        .map(|p| (format!("org{p}"), Key::generate()))
        .collect();
    let mut names = vec![];
    for i in 0..packages {
        let (org, key) = &keys[i % publishers];
        let dir = tmp.path().join(format!("src/{i}"));
        std::fs::create_dir_all(dir.join("bin"))?;
        std::fs::write(dir.join("package.yaml"), manifest(org, i))?;
        let body: Vec<u8> = (0..64 << 10).map(|j| (i * 131 + j * 7) as u8).collect();
        std::fs::write(dir.join("bin/app"), body)?;
        macula_hub::prepare::attest(&dir, &[key.signing()], "bench").map_err(|e| anyhow!("{e}"))?;
        let packed = pack(&dir, &store, Limits::default()).map_err(|e| anyhow!("{e}"))?;
        let index = store
            .read(&packed.digest, 1 << 20)?
            .ok_or_else(|| anyhow!("index"))?;
        let target = format!("{org}/pkg{i}@1.0.{i}");
        let current = repo.role_bytes(org).map(<[u8]>::to_vec);
        let role = sign_next_role(
            org,
            current.as_deref(),
            &[(target.clone(), index.clone(), serde_json::json!({}))],
            &[],
            std::slice::from_ref(key),
            Duration::from_secs(90 * 86_400),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        let d = Delegation {
            keys: vec![key.public()],
            threshold: 1,
        };
        repo.accept_role(org, &d, &role, &BTreeMap::from([(target.clone(), index)]))
            .await
            .map_err(|e| anyhow!("{e}"))?;
        names.push((target, i % publishers));
    }
    let root = repo.root_file(1).map_err(|e| anyhow!("{e}"))?;
    let source = Arc::new(DirSource(tmp.path().join("repo")));
    // The refresh: a fresh node (empty datastore) loads everything once.
    let mut refresh = vec![];
    let mut client = None;
    for r in 0..5 {
        let t = Instant::now();
        let c = Client::load(
            &root,
            source.clone(),
            &tmp.path().join(format!("ds{r}")),
            ClientOptions::default(),
        )
        .await
        .map_err(|e| anyhow!("{e}"))?;
        refresh.push(t.elapsed().as_secs_f64() * 1e3);
        client = Some(c);
    }
    let client = client.ok_or_else(|| anyhow!("no client"))?;
    let policy = Policy {
        capabilities: vec!["rpc:call:*".into()],
        max_instances: 1000,
        max_cpu_millis: 64_000,
        max_memory_bytes: 1 << 40,
    };
    let trusted: Vec<Trusted> = keys
        .iter()
        .map(|(_, k)| Trusted {
            keys: vec![k.public().0],
            threshold: 1,
        })
        .collect();
    let mut per = vec![];
    for _round in 0..3 {
        for (target, p) in &names {
            let t = Instant::now();
            let index = client.fetch(target).await.map_err(|e| anyhow!("{e}"))?;
            let r = review(
                &index,
                &store,
                &Rules {
                    publisher: &trusted[*p],
                    policy: &policy,
                    osv: None,
                },
            )
            .map_err(|p| anyhow!("{}", macula_hub::review::describe(&p)))?;
            std::hint::black_box(r);
            per.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    // A bundle of every package, imported as an air-gapped site would (verified blob by blob,
    // the TUF chain, every index and file), into an empty node directory.
    let bundle_path = tmp.path().join("all.bmz");
    let (snapshot, timestamp, _) = repo
        .bundle_metadata(Duration::from_secs(30 * 86_400), None)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let md = tmp.path().join("repo/metadata");
    let mut files: Vec<(String, macula_hub::bundle::Source)> = vec![];
    for e in std::fs::read_dir(&md)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "timestamp.json" || name.ends_with(".snapshot.json") || name.contains(".tmp") {
            continue;
        }
        files.push((
            format!("repo/metadata/{name}"),
            macula_hub::bundle::Source::File(e.path()),
        ));
    }
    files.push((
        "repo/metadata/timestamp.json".into(),
        macula_hub::bundle::Source::Bytes(timestamp),
    ));
    files.push((
        format!("repo/metadata/{}.snapshot.json", repo.snapshot_version()),
        macula_hub::bundle::Source::Bytes(snapshot),
    ));
    let targets = tmp.path().join("repo/targets");
    for org in std::fs::read_dir(&targets)? {
        let org = org?;
        for t in std::fs::read_dir(org.path())? {
            let t = t?;
            files.push((
                format!(
                    "repo/targets/{}/{}",
                    org.file_name().to_string_lossy(),
                    t.file_name().to_string_lossy()
                ),
                macula_hub::bundle::Source::File(t.path()),
            ));
        }
    }
    for b in std::fs::read_dir(store.root().join("sha256"))? {
        let b = b?;
        files.push((
            format!("blobs/sha256/{}", b.file_name().to_string_lossy()),
            macula_hub::bundle::Source::File(b.path()),
        ));
    }
    let digests: BTreeMap<String, String> = client
        .releases()
        .into_iter()
        .map(|r| (r.name, r.digest.to_string()))
        .collect();
    let manifest = macula_hub::bundle::Manifest {
        kind: macula_hub::bundle::BUNDLE_KIND.into(),
        created: String::new(),
        expires: String::new(),
        packages: names
            .iter()
            .map(|(t, _)| macula_hub::bundle::Entry {
                target: t.clone(),
                digest: digests.get(t).cloned().unwrap_or_default(),
            })
            .collect(),
        osv: None,
    };
    macula_hub::bundle::write(std::fs::File::create(&bundle_path)?, &manifest, files)
        .map_err(|e| anyhow!("{e}"))?;
    let bundle_bytes = std::fs::metadata(&bundle_path)?.len();
    let mut imports = vec![];
    for r in 0..3 {
        let into = tmp.path().join(format!("site{r}"));
        let t = Instant::now();
        let done = macula_hub::bundle::import(&bundle_path, &into, &root, 1 << 30)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        imports.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            done.manifest.packages.len() == packages,
            "imported {}",
            done.manifest.packages.len()
        );
    }
    let p50 = percentile(&per, 0.5);
    let p95 = percentile(&per, 0.95);
    Ok(vec![
        Figure {
            scenario: format!("bundle import of {packages} packages"),
            server: "macula",
            value: percentile(&imports, 0.5),
            unit: "ms p50",
            note: format!(
                "{:.1} MiB bundle into an empty node directory: every blob hashed, the TUF chain and every index verified (max {:.0} ms of 3)",
                bundle_bytes as f64 / (1 << 20) as f64,
                percentile(&imports, 1.0)
            ),
        },
        Figure {
            scenario: format!("verify one package ({packages} packages, {publishers} publishers)"),
            server: "macula",
            value: p95,
            unit: "ms p95",
            note: format!(
                "p50 {p50:.2} ms, max {:.2} ms over {} verifications: index through TUF, manifest, SBOM, provenance signature and subjects (goal ≤ 5 ms)",
                percentile(&per, 1.0),
                per.len()
            ),
        },
        Figure {
            scenario: format!("TUF refresh of {publishers} publishers' roles"),
            server: "macula",
            value: percentile(&refresh, 0.5),
            unit: "ms p50",
            note: format!(
                "a node with no metadata yet: root, timestamp, snapshot, targets and every role verified (max {:.1} ms of 5)",
                percentile(&refresh, 1.0)
            ),
        },
    ])
}
