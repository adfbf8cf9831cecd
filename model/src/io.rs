//! safetensors files and diffusers checkpoint directories: memory-mapped reading (whole
//! tensors or one tensor-parallel rank's shard), and atomic writing of f32 outputs.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::backend::{Backend, Tensor};
use crate::dtype::{DType, HostSlice};
use crate::error::{Error, Result};

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and we only read it; a concurrent writer truncating
        // it is outside what this program supports (checkpoints are immutable inputs).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, meta) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| Error::SafeTensors {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + n,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().into_keys().collect();
        v.sort();
        v
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.data_offsets.0..self.data_start + info.data_offsets.1]
    }

    /// Read a tensor as f32 (any of F32, BF16, F16 on disk). Returns (shape, data).
    pub fn read_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self.info(name).ok_or_else(|| {
            Error::input(
                name,
                format!(
                    "not found in {}; it holds: {}",
                    self.path.display(),
                    self.names().join(", ")
                ),
            )
        })?;
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
            Error::input(
                name,
                format!(
                    "dtype {:?} is not supported; use F32, BF16 or F16",
                    info.dtype
                ),
            )
        })?;
        Ok((info.shape.clone(), decode(dtype, self.bytes(info)).to_f32()))
    }
}

/// Decoded element data, owned.
enum Owned {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

impl Owned {
    fn as_slice(&self) -> HostSlice<'_> {
        match self {
            Owned::F32(v) => HostSlice::F32(v),
            Owned::BF16(v) => HostSlice::BF16(v),
            Owned::F16(v) => HostSlice::F16(v),
        }
    }

    fn to_f32(&self) -> Vec<f32> {
        match self {
            Owned::F32(v) => v.clone(),
            _ => self.as_slice().to_f32_vec(),
        }
    }
}

fn decode(dtype: DType, bytes: &[u8]) -> Owned {
    match dtype {
        DType::F32 => Owned::F32(
            bytes
                .par_chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        DType::BF16 => Owned::BF16(
            bytes
                .par_chunks_exact(2)
                .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        ),
        DType::F16 => Owned::F16(
            bytes
                .par_chunks_exact(2)
                .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
        ),
    }
}

/// Read one tensor of an in-memory safetensors file as f32: (shape, data).
pub fn read_f32_bytes(bytes: &[u8], name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let bad = |reason: String| Error::input(name, reason);
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let view = st.tensor(name).map_err(|_| {
        bad(format!(
            "not found; the file holds: {}",
            st.names().join(", ")
        ))
    })?;
    let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
        bad(format!(
            "dtype {:?} is not supported; use F32, BF16 or F16",
            view.dtype()
        ))
    })?;
    Ok((view.shape().to_vec(), decode(dtype, view.data()).to_f32()))
}

/// An f32 tensor as safetensors sees it (little-endian bytes without a copy where possible).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            // The in-memory bytes already are the little-endian encoding: no copy.
            std::borrow::Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            self.data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

type Named<'a> = (&'a str, &'a [usize], &'a [f32]);

fn f32_views<'a>(
    what: &'static str,
    tensors: &'a [Named<'a>],
) -> Result<impl Iterator<Item = (String, F32View<'a>)>> {
    for (name, shape, data) in tensors {
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::shape(
                what,
                format!("{name}: shape {shape:?} for {} values", data.len()),
            ));
        }
    }
    Ok(tensors
        .iter()
        .map(|(n, shape, data)| (n.to_string(), F32View { shape, data })))
}

/// A hidden sibling of `path` to write before renaming it into place, unique to this call
/// (process id and a per-process counter): writers of the same path at once, in one process or
/// several, never write into each other's file or directory.
pub fn temp_sibling(path: &Path) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}-{call}.partial", std::process::id()))
}

/// Write f32 tensors to a safetensors file atomically (a temporary file renamed into place).
pub fn write_f32(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<()> {
    let views = f32_views("write_f32", tensors)?;
    let tmp = temp_sibling(path);
    let written = safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| Error::SafeTensors {
            path: tmp.clone(),
            reason: e.to_string(),
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// f32 tensors and string metadata as an in-memory safetensors file.
pub fn f32_safetensors(
    tensors: &[(&str, &[usize], &[f32])],
    metadata: std::collections::HashMap<String, String>,
) -> Result<Vec<u8>> {
    let views = f32_views("f32_safetensors", tensors)?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::SafeTensors {
        path: "<memory>".into(),
        reason: e.to_string(),
    })
}

/// The string metadata of an in-memory safetensors file.
pub fn safetensors_metadata(bytes: &[u8]) -> Result<std::collections::HashMap<String, String>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::input("checkpoint", format!("not a valid safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Read a JSON file into a value.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Which part of a tensor one tensor-parallel rank holds: indices `start..start + len` of
/// dimension `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub start: usize,
    pub len: usize,
}

/// Rank `rank`'s range of `size` items split as evenly as possible over `world` ranks (sizes
/// differ by at most one).
pub fn balanced_range(size: usize, rank: usize, world: usize) -> (usize, usize) {
    let start = rank * size / world;
    let end = (rank + 1) * size / world;
    (start, end - start)
}

/// A diffusers component directory (`transformer/`, `vae/`, ...): `config.json` plus one
/// `<stem>.safetensors` or sharded files listed in `<stem>.safetensors.index.json`.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open the weights of a component directory whose files are named `<stem>.safetensors`
    /// (`diffusion_pytorch_model` for diffusers models, `model` for transformers models).
    pub fn open(dir: &Path, stem: &str) -> Result<Self> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index_path = dir.join(format!("{stem}.safetensors.index.json"));
        let mut files = Vec::new();
        let mut index = HashMap::new();
        if index_path.exists() {
            let json = read_json(&index_path)?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    key: "weight_map".into(),
                    reason: "missing or not an object of tensor name -> file name".into(),
                })?;
            let mut by_file: HashMap<String, usize> = HashMap::new();
            let mut names: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            names.sort_by(|a, b| a.0.cmp(b.0));
            for (name, file) in names {
                let file = file.as_str().ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    key: format!("weight_map.{name}"),
                    reason: "must be a file name".into(),
                })?;
                let fi = match by_file.get(file) {
                    Some(&i) => i,
                    None => {
                        files.push(SafetensorsFile::open(&dir.join(file))?);
                        by_file.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if files[fi].info(name).is_none() {
                    return Err(Error::MissingTensor {
                        dir: dir.to_path_buf(),
                        name: format!("{name} (listed in the index for {file}, absent from it)"),
                        expected: vec![],
                    });
                }
                index.insert(name.clone(), fi);
            }
        } else if single.exists() {
            let f = SafetensorsFile::open(&single)?;
            for n in f.names() {
                index.insert(n, 0);
            }
            files.push(f);
        } else {
            return Err(Error::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "no weights: expected {stem}.safetensors or {stem}.safetensors.index.json"
                    ),
                ),
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            index,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> BTreeSet<&str> {
        self.index.keys().map(|s| s.as_str()).collect()
    }

    fn locate(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<(&SafetensorsFile, &TensorInfo, DType)> {
        let missing = || Error::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
        };
        let file = &self.files[*self.index.get(name).ok_or_else(missing)?];
        let info = file.info(name).ok_or_else(missing)?;
        if info.shape != expected {
            return Err(Error::TensorShape {
                dir: self.dir.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| Error::TensorDtype {
            dir: self.dir.clone(),
            name: name.to_string(),
            found: format!("{:?}", info.dtype),
        })?;
        Ok((file, info, dtype))
    }

    /// Load a tensor (or one rank's shard of it) onto a device, keeping its storage type.
    pub fn load<B: Backend>(
        &self,
        backend: &B,
        name: &str,
        expected: &[usize],
        shard: Option<Shard>,
    ) -> Result<Tensor<B>> {
        let (file, info, dtype) = self.locate(name, expected)?;
        let bytes = file.bytes(info);
        let Some(sh) = shard.filter(|s| s.len != expected[s.dim]) else {
            return backend.upload(expected, decode(dtype, bytes).as_slice());
        };
        let size = expected[sh.dim];
        if sh.start + sh.len > size {
            return Err(Error::Parallel(format!(
                "tensor `{name}`: part {}..{} of dimension {} (size {size})",
                sh.start,
                sh.start + sh.len,
                sh.dim
            )));
        }
        let inner: usize = expected[sh.dim + 1..].iter().product();
        let outer: usize = expected[..sh.dim].iter().product();
        let es = dtype.size();
        let run = sh.len * inner * es;
        let mut out = Vec::with_capacity(outer * run);
        for o in 0..outer {
            let start = (o * size + sh.start) * inner * es;
            out.extend_from_slice(&bytes[start..start + run]);
        }
        let mut shape = expected.to_vec();
        shape[sh.dim] = sh.len;
        backend.upload(&shape, decode(dtype, &out).as_slice())
    }
}

/// Loads a model's tensors from a checkpoint, remembering which were taken so that leftovers can
/// be reported as errors (a checkpoint for a different architecture or config).
pub struct WeightLoader<'a, B: Backend> {
    ckpt: &'a Checkpoint,
    backend: &'a B,
    taken: RefCell<BTreeSet<String>>,
    shard_rank: usize,
    shard_world: usize,
}

impl<'a, B: Backend> WeightLoader<'a, B> {
    pub fn new(ckpt: &'a Checkpoint, backend: &'a B, rank: usize, world: usize) -> Self {
        WeightLoader {
            ckpt,
            backend,
            taken: RefCell::new(BTreeSet::new()),
            shard_rank: rank,
            shard_world: world,
        }
    }

    /// A whole tensor (replicated on every rank).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor<B>> {
        self.taken.borrow_mut().insert(name.to_string());
        self.ckpt.load(self.backend, name, shape, None)
    }

    /// This rank's part of a tensor split along `dim` as evenly as possible over the ranks
    /// (callers that need equal parts, such as heads, check divisibility first).
    pub fn get_split(&self, name: &str, shape: &[usize], dim: usize) -> Result<Tensor<B>> {
        self.taken.borrow_mut().insert(name.to_string());
        let dim_size = *shape.get(dim).ok_or_else(|| {
            Error::shape("get_split", format!("{name}: dimension {dim} of {shape:?}"))
        })?;
        let (start, len) = balanced_range(dim_size, self.shard_rank, self.shard_world);
        let shard = Shard { dim, start, len };
        self.ckpt.load(self.backend, name, shape, Some(shard))
    }

    /// Fail if the checkpoint holds tensors nobody took (except names containing one of
    /// `ignored`, which the reference also skips).
    pub fn finish(self, ignored: &[&str]) -> Result<()> {
        let taken = self.taken.into_inner();
        let extra: Vec<&str> = self
            .ckpt
            .names()
            .into_iter()
            .filter(|n| !taken.contains(*n) && !ignored.iter().any(|i| n.contains(i)))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = extra.iter().take(8).copied().collect();
        let more = if extra.len() > 8 {
            format!(" and {} more", extra.len() - 8)
        } else {
            String::new()
        };
        Err(Error::UnexpectedTensors {
            dir: self.ckpt.dir().to_path_buf(),
            names: format!("{}{more}", shown.join(", ")),
        })
    }
}
