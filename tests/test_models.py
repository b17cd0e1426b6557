import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lit_bluelm.anyres import candidate_grids, image_to_tiles, select_best_grid
from lit_bluelm.config import ConfigError, load_config
from lit_bluelm.models import (
    ADAPTERS,
    LLMS,
    VISION_ENCODERS,
    BlueLM,
    MLPAdapter,
    build_model,
    tokens_per_tile,
)
from lit_bluelm.models.vision import build_tiny_vit, load_vision_weights


@pytest.fixture(scope="module")
def tiny_cfg():
    cfg = load_config([])
    cfg.model.image_token_id = 5
    return cfg.model


def test_registries_hold_the_documented_entries():
    assert set(VISION_ENCODERS) == {"siglip2", "tiny_vit"}
    assert set(ADAPTERS) == {"mlp2x2"}
    assert set(LLMS) == {"from_config", "from_pretrained"}


def test_tiny_vit_returns_patch_tokens(tiny_cfg):
    tower = VISION_ENCODERS["tiny_vit"](tiny_cfg.vision)
    out = tower(torch.randn(3, 3, 112, 112))
    assert tower.grid_size == 8 and out.shape == (3, 64, tiny_cfg.vision.embed_dim)


def test_siglip2_is_the_so400m_trunk_on_meta(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg.vision, {"name": "siglip2", "image_size": 378, "patch_size": 14})
    with torch.device("meta"):
        tower = VISION_ENCODERS["siglip2"](cfg)
        out = tower(torch.empty(2, 3, 378, 378))
    assert out.shape == (2, 729, 1152)  # 27 x 27 patch tokens, no CLS, no pooled embedding
    assert tower.trunk.attn_pool is None
    n = sum(p.numel() for p in tower.parameters())
    assert 3.9e8 < n < 4.2e8


def test_siglip2_refuses_mismatched_tile_size(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg.vision, {"name": "siglip2", "image_size": 112})
    with torch.device("meta"), pytest.raises(ConfigError, match="378"):
        VISION_ENCODERS["siglip2"](cfg)


def test_vision_weights_load_from_open_clip_layout(tiny_cfg, tmp_path):
    src = build_tiny_vit(tiny_cfg.vision)
    state = {f"visual.trunk.{k}": v for k, v in src.trunk.state_dict().items()}
    state["text.token_embedding.weight"] = torch.zeros(3, 3)  # the text tower is ignored
    torch.save(state, tmp_path / "open_clip.bin")
    dst = build_tiny_vit(tiny_cfg.vision)
    load_vision_weights(dst, str(tmp_path / "open_clip.bin"))
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(ConfigError, match="no such file"):
        load_vision_weights(dst, str(tmp_path / "missing.bin"))


def test_adapter_maps_27x27_grid_to_196_tokens():
    adapter = MLPAdapter(in_dim=8, out_dim=16, downsample=2)
    out = adapter(torch.randn(2, 27 * 27, 8))
    assert out.shape == (2, 196, 16)
    assert tokens_per_tile(27, 2) == 196 and tokens_per_tile(8, 2) == 16


def test_space_to_depth_groups_2x2_neighbourhoods():
    adapter = MLPAdapter(in_dim=1, out_dim=4, downsample=2)
    grid = torch.arange(9.0).view(1, 9, 1)  # 3x3 grid: rows [0 1 2] [3 4 5] [6 7 8], padded to 4x4
    merged = adapter.space_to_depth(grid)
    assert merged.shape == (1, 4, 4)
    # token 0 = top-left 2x2 block, channels ordered (row, col) within the block
    assert merged[0, 0].tolist() == [0, 1, 3, 4]
    assert merged[0, 1].tolist() == [2, 0, 5, 0]  # right edge: padded column
    assert merged[0, 3].tolist() == [8, 0, 0, 0]


@pytest.mark.parametrize(
    "size, grid",
    [
        ((378, 378), (1, 1)),
        ((100, 80), (1, 1)),  # small images are not blown up to many tiles
        ((756, 378), (2, 1)),  # wide: cols x rows
        ((378, 756), (1, 2)),  # tall
        ((1512, 1512), (4, 4)),
        ((4000, 3000), (4, 3)),  # 4:3 keeps its aspect ratio at full grid
        ((3000, 200), (4, 1)),  # very wide: widest grid
        ((1000, 1000), (3, 3)),
    ],
)
def test_anyres_picks_best_grid(size, grid):
    assert select_best_grid(*size, tile=378, grids=candidate_grids(4, 16)) == grid


def test_anyres_tiles_row_major_then_thumbnail():
    grids = candidate_grids(2, 4)
    # four quadrants of a 224x224 image: red, green / blue, white
    image = Image.new("RGB", (224, 224))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    for i, colour in enumerate(colours):
        image.paste(colour, ((i % 2) * 112, (i // 2) * 112, (i % 2 + 1) * 112, (i // 2 + 1) * 112))
    tiles = image_to_tiles(image, 112, grids)
    assert tiles.shape == (5, 3, 112, 112)  # 2x2 grid + thumbnail
    for i, colour in enumerate(colours):  # pixels normalised to [-1, 1]
        expected = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
        torch.testing.assert_close(tiles[i, :, 56, 56], expected)
    thumb = tiles[4]  # the whole image shrunk: its quadrants again
    torch.testing.assert_close(thumb[:, 10, 10], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(thumb[:, 100, 100], torch.tensor([1.0, 1.0, 1.0]))
    wide = image_to_tiles(Image.new("RGB", (224, 112), (255, 0, 0)), 112, grids)
    assert wide.shape == (3, 3, 112, 112)  # 2x1 grid + thumbnail
    single = image_to_tiles(Image.new("RGB", (112, 112)), 112, grids)
    assert single.shape == (1, 3, 112, 112)  # a 1x1 grid needs no thumbnail
    assert len(candidate_grids(4, 16)) == 16 and len(candidate_grids(4, 6)) < 16


def test_llm_from_config_and_from_pretrained(tiny_cfg, tmp_path):
    llm = LLMS["from_config"](tiny_cfg.llm)
    assert llm.config.hidden_size == 128 and llm.config.vocab_size == 1024
    llm.save_pretrained(tmp_path / "llm")
    cfg = OmegaConf.merge(tiny_cfg.llm, {"name": "from_pretrained", "path": str(tmp_path / "llm")})
    loaded = LLMS["from_pretrained"](cfg)
    ids = torch.randint(0, 1024, (1, 6))
    torch.testing.assert_close(loaded(ids).logits, llm(ids).logits)
    bad = OmegaConf.merge(cfg, {"path": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="model.llm.path"):
        LLMS["from_pretrained"](bad)


def test_yarn_without_original_length_is_refused(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg.llm, {"config": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}})
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        LLMS["from_config"](cfg)


def test_image_features_land_exactly_at_placeholders(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg).eval()
    img = model.image_token_id
    per_tile = model.tokens_per_tile
    # row 0: text, 2 tiles of image, text; row 1: text, 1 tile, padding
    row0 = [10, 11] + [img] * (2 * per_tile) + [12]
    row1 = [13] + [img] * per_tile + [14] + [0] * (per_tile + 1)
    ids = torch.tensor([row0, row1])
    pixels = torch.randn(3, 3, 112, 112)
    embeds = model.embed(ids, pixels)
    features = model.encode_images(pixels)  # [3 * per_tile, D]
    token_embeds = model.llm.get_input_embeddings()(ids)
    mask = ids == img
    torch.testing.assert_close(embeds[mask], features)
    torch.testing.assert_close(embeds[~mask], token_embeds[~mask])
    assert model(ids, pixel_values=pixels).shape == (2, ids.shape[1], 1024)


def test_placeholder_feature_mismatch_is_a_clear_error(tiny_cfg):
    model = build_model(tiny_cfg)
    ids = torch.tensor([[1] + [model.image_token_id] * model.tokens_per_tile])
    with pytest.raises(ValueError, match="disagree"):
        model.embed(ids, torch.randn(2, 3, 112, 112))
    with pytest.raises(ValueError, match="no pixel_values"):
        model.embed(ids)


def test_text_only_model_has_no_vision(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"text_only": True})
    model = build_model(cfg)
    assert model.vision is None and model.adapter is None
    assert isinstance(model, BlueLM) and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 1024)


def test_text_only_batch_under_several_ranks_runs_the_tower_on_a_blank_tile(tiny_cfg, monkeypatch):
    model = build_model(tiny_cfg)
    ids = torch.tensor([[1, 2, 3, 4]])
    single = model(ids)
    assert all(p.grad is None for p in model.vision.parameters())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    calls = []
    model.vision.register_forward_hook(lambda *args: calls.append(1))
    multi = model(ids)
    assert calls == [1]  # the same collectives as a rank whose batch has images
    torch.testing.assert_close(multi, single)  # with weight 0: no effect on the output
    multi.sum().backward()
    grads = [p.grad for p in model.vision.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # used, with zero gradient
