"""The weight manifest: a consistent table, recognition of local files by hash, verified
downloads (from a local HTTP server: no internet), and ``.pth`` files as ``load_pretrained`` /
``init_checkpoint`` sources."""
import contextlib
import dataclasses
import hashlib
import http.server
import os
import pathlib
import threading

import jax
import ml_collections
import numpy as np
import pytest

import refinenet_jax as rj
from refinenet_jax import train
from refinenet_jax.convert import LAYOUTS, export_state_dict, load_pretrained, manifest
from refinenet_jax.convert.manifest import WeightsDownloadError, WeightsHashError
from refinenet_jax.convert.torch_io import save_torch_state_dict
from refinenet_jax.models.preprocessing import NORMALIZATIONS
from refinenet_jax.testing import bare_run, random_variables

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
TINY, CLASSES = 'lw_refinenet_tiny', 3


# ------------------------------------------------------------------------ the table

def test_every_entry_fits_a_registered_model_and_layout():
  assert len(manifest.ENTRIES) == len(manifest.MANIFEST) == 39
  assert len({e.file_name for e in manifest.ENTRIES}) == len(manifest.ENTRIES)
  assert len({e.url for e in manifest.ENTRIES}) == len(manifest.ENTRIES)
  for e in manifest.ENTRIES:
    assert e.model in rj.list_models() and e.layout in LAYOUTS, e.key
    assert e.normalization in NORMALIZATIONS, e.key
    assert LAYOUTS[e.layout].normalization == e.normalization, e.key
    assert LAYOUTS[e.layout].whole_model == e.whole_model, e.key
    assert e.url.startswith('https://'), e.key
    if e.source == 'pytorch/vision':  # the published hash prefix is the one in the file name
      assert e.url.endswith('/' + e.file_name) and f'-{e.sha256}.' in e.file_name
      assert len(e.sha256) == 8 and int(e.sha256, 16) >= 0
    else:
      assert e.sha256 is None  # nobody else publishes one
    assert (e.md5 is not None) == (e.source == 'wkentaro/pytorch-fcn'), e.key
    if e.class_names is not None:
      assert len(e.class_names) == e.num_classes
  verified = [e.key for e in manifest.ENTRIES if e.verifiable]
  assert len(verified) == 20  # 15 torchvision (sha256 prefix), 5 wkentaro (md5)


def test_class_names_are_the_dataset_builders():
  from refinenet_jax.data import datasets
  for key, builder in [('fcn8s_voc', 'voc2012'), ('refinenet101_nyudv2', 'nyudv2_40'),
                       ('lw_refinenet101_context', 'pascal_context')]:
    assert manifest.get(key).class_names == datasets.BUILDERS[builder].CLASS_NAMES
  assert all(len(e.class_names) == e.num_classes for e in manifest.ENTRIES if e.whole_model)
  assert manifest.get('resnet101_v1').class_names is None  # encoder only
  with pytest.raises(KeyError, match='no manifest entry'):
    manifest.get('nope')


def test_readme_table_is_the_generated_one():
  assert manifest.markdown_table() in README.read_text()


# ------------------------------------------------------------------------ local files

def _tiny_pth(path, seed=0):
  """A small real checkpoint (drsleep layout) and the variables it holds."""
  model = rj.create_model(TINY, CLASSES)
  variables = random_variables(model, seed=seed)
  save_torch_state_dict(export_state_dict(variables), path)
  return variables


def _sha256(path):
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _entry(path_or_url, sha256=None, **kw):
  name = os.path.basename(path_or_url)
  fields = dict(key='tiny_test', model=TINY, file_name=name, url=path_or_url, layout='drsleep',
                normalization='imagenet', num_classes=CLASSES, dataset='test', source='tests',
                sha256=sha256)
  return manifest.Weights(**{**fields, **kw})


def test_lookup_by_hash_prefix_md5_or_size(tmp_path):
  p = tmp_path / 'tiny.pth'
  _tiny_pth(p)
  sha, md5 = _sha256(p), hashlib.md5(p.read_bytes()).hexdigest()
  full, prefix = _entry('x/other_name.pth', sha), _entry('x/other_name.pth', sha[:8])
  by_md5 = _entry('x/other.pth', md5=md5)
  assert manifest.lookup(p, [full]) is full  # the name does not matter when the hash matches
  assert manifest.lookup(p, [prefix]) is prefix
  assert manifest.lookup(p, [by_md5]) is by_md5
  sized = _entry('x/tiny.pth', size=p.stat().st_size)
  assert manifest.lookup(p, [sized]) is sized  # no hash: name and size
  assert manifest.lookup(p, [_entry('x/other.pth', size=p.stat().st_size)]) is None
  assert manifest.lookup(p, [_entry('x/tiny.pth')]) is None  # nothing published: unknown
  assert manifest.lookup(p) is None  # none of the published files


def test_a_published_name_with_other_contents_is_refused(tmp_path):
  p = tmp_path / 'resnet50-0676ba61.pth'  # torchvision's ResNet-50 name, not its bytes
  _tiny_pth(p)
  with pytest.raises(WeightsHashError) as e:
    manifest.lookup(p)
  msg = str(e.value)
  assert str(p) in msg and 'sha256 0676ba61...' in msg and _sha256(p) in msg
  q = tmp_path / 'fcn8s_from_caffe.pth'
  q.write_bytes(p.read_bytes())
  with pytest.raises(WeightsHashError, match='md5 de93e540ec79512f8770033849c8ae89'):
    manifest.lookup(q)
  with pytest.raises(WeightsHashError, match='expected 5 bytes'):
    manifest.lookup(p, [_entry('x/resnet50-0676ba61.pth', size=5)])


# ------------------------------------------------------------------------ downloads

class _Server:
  """A local HTTP server on 127.0.0.1 serving ``files`` (name -> bytes); counts requests."""

  def __init__(self, files):
    self.files, self.requests = files, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.requests.append(self.path)
        body = server.files.get(self.path.lstrip('/'))
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def served(tmp_path):
  src = tmp_path / 'src' / 'tiny.pth'
  src.parent.mkdir()
  variables = _tiny_pth(src)
  with _Server({'tiny.pth': src.read_bytes()}) as server:
    yield server, src, variables


def test_download_verifies_then_caches(served, tmp_path):
  server, src, _ = served
  entry = _entry(server.url + 'tiny.pth', _sha256(src))
  cache = tmp_path / 'cache'
  path = manifest.download(entry, cache)
  assert path == str(cache / 'tiny.pth') and pathlib.Path(path).read_bytes() == src.read_bytes()
  assert len(server.requests) == 1 and os.listdir(cache) == ['tiny.pth']  # no temp file left
  assert manifest.download(entry, cache) == path  # re-verified, not fetched again
  assert len(server.requests) == 1
  # the default folder comes from the environment
  with _env(manifest.CACHE_ENV, str(tmp_path / 'env_cache')):
    assert manifest.download(entry) == str(tmp_path / 'env_cache' / 'tiny.pth')
  assert len(server.requests) == 2
  # a prefix (torchvision-style) and an md5 verify as well
  md5 = hashlib.md5(src.read_bytes()).hexdigest()
  for i, e in enumerate([dataclasses.replace(entry, sha256=entry.sha256[:8]),
                         dataclasses.replace(entry, sha256=None, md5=md5)]):
    assert manifest.download(e, tmp_path / f'c{i}')


def test_download_hash_mismatch_keeps_nothing(served, tmp_path):
  server, src, _ = served
  wrong = '0' * 64
  entry = _entry(server.url + 'tiny.pth', wrong)
  cache = tmp_path / 'cache'
  with pytest.raises(WeightsHashError) as e:
    manifest.download(entry, cache)
  msg = str(e.value)
  assert entry.url in msg and wrong in msg and _sha256(src) in msg and 'nothing was kept' in msg
  assert os.listdir(cache) == []


def test_download_http_error_is_clear(served, tmp_path):
  server, src, _ = served
  entry = _entry(server.url + 'missing.pth', _sha256(src))
  with pytest.raises(WeightsDownloadError, match=r'missing\.pth: HTTP 404'):
    manifest.download(entry, tmp_path / 'cache')
  assert os.listdir(tmp_path / 'cache') == []


def test_a_wrong_cached_file_is_reported_and_left_alone(served, tmp_path):
  server, src, _ = served
  entry = _entry(server.url + 'tiny.pth', _sha256(src))
  (tmp_path / 'cache').mkdir()
  mine = tmp_path / 'cache' / 'tiny.pth'
  mine.write_bytes(b'my own file')
  with pytest.raises(WeightsHashError, match='left as it is'):
    manifest.download(entry, tmp_path / 'cache')
  assert mine.read_bytes() == b'my own file' and not server.requests


@contextlib.contextmanager
def _env(name, value):
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      del os.environ[name]
    else:
      os.environ[name] = old


# ------------------------------------------------------------------------ as model weights

@pytest.fixture
def known_tiny(tmp_path, monkeypatch):
  """A generated checkpoint registered as a published (hashed) manifest entry."""
  p = tmp_path / 'tiny_published.pth'
  variables = _tiny_pth(p)
  entry = _entry('https://example.invalid/tiny_published.pth', _sha256(p), key='tiny_published')
  monkeypatch.setattr(manifest, 'ENTRIES', (entry,))
  monkeypatch.setattr(manifest, 'MANIFEST', {entry.key: entry})
  return p, variables, entry


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])


def test_load_pretrained_recognises_a_known_file(known_tiny, tmp_path):
  p, variables, entry = known_tiny
  model, got, found = load_pretrained(str(p))
  assert found is entry and model.num_classes == CLASSES and model.normalization == 'imagenet'
  _same(got, variables)
  with pytest.raises(ValueError, match='has 3 classes .test.; the model needs 5'):
    load_pretrained(str(p), TINY, 5)
  with pytest.raises(ValueError, match='a whole lw_refinenet_tiny, not refinenet_tiny'):
    load_pretrained(str(p), 'refinenet_tiny')
  with pytest.raises(ValueError, match="expects 'imagenet' input normalisation"):
    load_pretrained(str(p), normalization='minus128')
  with pytest.raises(ValueError, match="layout is 'drsleep', not 'wkentaro_fcn'"):
    load_pretrained(str(p), layout='wkentaro_fcn')


def test_load_pretrained_by_key_downloads(known_tiny, tmp_path):
  p, variables, entry = known_tiny
  with _Server({'tiny_published.pth': p.read_bytes()}) as server:
    entry = dataclasses.replace(entry, url=server.url + 'tiny_published.pth')
    manifest.MANIFEST['tiny_published'] = entry
    _, got, found = load_pretrained('tiny_published', cache_dir=str(tmp_path / 'cache'))
  assert found is entry and len(server.requests) == 1
  _same(got, variables)


def test_an_unknown_file_needs_an_explicit_layout(tmp_path):
  p = tmp_path / 'mine.pth'
  variables = _tiny_pth(p, seed=1)
  with pytest.raises(ValueError, match='give its layout explicitly; layouts: drsleep, '):
    load_pretrained(str(p), TINY, CLASSES)
  model, got, entry = load_pretrained(str(p), TINY, CLASSES, layout='drsleep')
  assert entry is None
  _same(got, variables)


def test_init_checkpoint_pth(known_tiny, tmp_path, monkeypatch):
  p, variables, _ = known_tiny
  config = ml_collections.ConfigDict(dict(init_checkpoint=str(p), init_checkpoint_layout='',
                                          seed=0, model=TINY, num_classes=CLASSES))
  run = bare_run(rj.create_model(TINY, CLASSES))
  state = train.initial_state(config, run)
  _same({'params': state.params}, variables)
  config.num_classes = 4
  with pytest.raises(ValueError, match='has 3 classes .test.; the model needs 4'):
    train._init_variables(config, bare_run(rj.create_model(TINY, 4)))
  # the same bytes, unknown to the manifest: refused without a layout, loaded with one
  monkeypatch.setattr(manifest, 'ENTRIES', ())
  config.num_classes = CLASSES
  with pytest.raises(ValueError, match='give its layout explicitly'):
    train._init_variables(config, run)
  config.init_checkpoint_layout = 'drsleep'
  _same(train._init_variables(config, run), variables)


def test_convert_cli_takes_the_layout_from_the_manifest(known_tiny, tmp_path, capsys):
  import json
  from refinenet_jax.convert.__main__ import main as convert_main
  p, _, _ = known_tiny
  args = [f'--model={TINY}', f'--num_classes={CLASSES}', f'--checkpoint={p}']
  assert convert_main(args + [f'--output={tmp_path / "out"}']) == 0
  meta = json.loads((tmp_path / 'out' / 'refinenet_jax_model.json').read_text())
  assert meta['source'] == f'tiny_published:{p}'
  with pytest.raises(SystemExit):  # the manifest knows it has 3 classes
    convert_main([f'--model={TINY}', '--num_classes=4', f'--checkpoint={p}',
                  f'--output={tmp_path / "out4"}'])
  assert 'the model needs 4' in capsys.readouterr().err
  manifest.ENTRIES = ()  # (restored by the fixture's monkeypatch)
  with pytest.raises(SystemExit):
    convert_main(args + [f'--output={tmp_path / "out2"}'])
  assert 'give its layout explicitly' in capsys.readouterr().err
  assert not (tmp_path / 'out4').exists() and not (tmp_path / 'out2').exists()
