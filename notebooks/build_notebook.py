"""Writes notebooks/feature_maps.ipynb (run: python notebooks/build_notebook.py). Kept as code so diffs are readable."""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md(
        "# What do the cached feature maps hold?\n\n"
        "This notebook opens the feature-map cache that `make train` built for a config, and looks at each depth of "
        "the frozen backbone: its shapes, how sparse and how class-selective its channels are, which channels are "
        "dead, what the maps of one image look like, how well each depth transfers to your task, how similar the "
        "depths are to each other, and where a classifier on these features looks.\n\n"
        "Every analysis is a tested function in `fmtransfer.analysis`; this notebook only calls and narrates them. "
        "`make analyze ARGS=...` writes the same figures as PNGs with an `analysis.md`, for readers without Jupyter."
    ),
    code(
        "# Parameters (papermill-style; `make notebook ARGS=...` injects a cell below with your overrides)\n"
        'overrides = []  # the same overrides as `make train`, e.g. ["experiment=hymenoptera"]\n'
        "out_dir = None  # where figures and the cache-side outputs go (default: logs/notebook/analysis)",
        metadata={"tags": ["parameters"]},
    ),
    code(
        "%matplotlib inline\n"
        "from pathlib import Path\n\n"
        "import matplotlib.pyplot as plt\n"
        "from IPython.display import Markdown, display\n\n"
        "from fmtransfer.analysis import run as A\n"
        "from fmtransfer.analysis.figures import (\n"
        "    activation_grid,\n"
        "    cka_figure,\n"
        "    depth_figure,\n"
        "    embedding_figure,\n"
        "    filters_figure,\n"
        "    image_rows_figure,\n"
        "    saliency_figure,\n"
        "    statistics_figure,\n"
        ")\n"
        "from fmtransfer.cli.common import quiet_libraries\n"
        "from fmtransfer.cli.config import compose_config\n\n\n"
        "def show(fig):\n"
        "    display(fig)\n"
        "    plt.close(fig)  # shown once, not again when the cell ends\n\n"
        "quiet_libraries()\n"
        'cfg = compose_config(list(overrides), name="analyze")\n'
        'an = A.open_analysis(cfg, Path(out_dir or Path(cfg.paths.log_dir) / "notebook" / "analysis"))\n'
        "a = cfg.analysis\n"
        'display(Markdown(f"**{cfg.data.path}** with **{an.ctx.spec.name}**: splits {an.ctx.data.sizes()}, "\n'
        '                 f"levels {an.levels}"))'
    ),
    md(
        "## Shapes\n\nChannels, cached spatial size, stride (reduction) and receptive field of each level. "
        "The receptive field is measured: the extent of the input pixels a centre unit's gradient reaches."
    ),
    code(
        "import timm\n\n"
        "from fmtransfer.analysis.statistics import receptive_fields, shapes_table\n\n"
        "arch = timm.create_model(an.ctx.spec.name)\n"
        "rf = receptive_fields(arch, {lv.name: lv.index for lv in an.ctx.spec.levels\n"
        "                             if lv.name in an.levels and lv.index is not None}, a.rf_input_size)\n"
        "rows = shapes_table(an.caches[a.split].split, rf)\n"
        "display(Markdown(A.shapes_markdown(rows)))"
    ),
    md(
        "## Sparsity, dead channels, class selectivity\n\n"
        "A channel is *dead* when it is zero on at least 99% of images. Selectivity near 1 means a channel fires for "
        "one class only. Early levels are generic (low selectivity); deep ones specialise."
    ),
    code(
        "from fmtransfer.analysis.statistics import all_level_statistics\n\n"
        "stats = all_level_statistics(an.caches[a.split].split)\n"
        "show(statistics_figure(stats))"
    ),
    md("## Activation grids\n\nThe most active channels of one level for a few validation images, with the input."),
    code(
        "spatial = [n for n in an.levels if an.caches[a.eval_split].split.level(n).ndim == 4]\n"
        "level = a.grid_level if a.grid_level in spatial else spatial[len(spatial) // 2]\n"
        "for i in a.images[:2]:\n"
        "    show(activation_grid(an.caches[a.eval_split].split.level(level)[i], A.input_image(an, a.eval_split, i),\n"
        '                            a.top_n, f"{level}, image {i}"))'
    ),
    md(
        "## Transfer by depth\n\nA linear probe on each level's pooled maps, fitted on train and scored on validation "
        "(the test split stays untouched). Close to ImageNet, deep levels win; far from it, middle levels often do."
    ),
    code(
        "from fmtransfer.analysis import transfer_by_depth\n\n"
        'depth = transfer_by_depth(an.caches["train"].split, an.caches["validation"].split)\n'
        'show(depth_figure(depth, "validation"))'
    ),
    md("## Representation similarity (linear CKA)"),
    code(
        "from fmtransfer.analysis.similarity import cka_matrix\n\n"
        "val = an.pooled(a.eval_split)\n"
        "names, cka = cka_matrix(val.features)\n"
        "show(cka_figure(names, cka))"
    ),
    md("## 2-D embeddings coloured by class"),
    code(
        "import numpy as np\n\n"
        "from fmtransfer.analysis.embedding import embed_2d\n\n"
        "keep = np.random.default_rng(0).permutation(len(val.labels))[: a.max_points]\n"
        'points = {n: embed_2d(val.features[n].numpy()[keep], "pca") for n in names}\n'
        'show(embedding_figure(points, val.labels.numpy()[keep], an.ctx.data.class_names, "pca"))'
    ),
    md(
        "## Full-resolution feature maps\n\nThe maps of one natural photo at every level, at the level's own "
        "resolution (the cache stores them pooled). Early levels respond to edges and colours at each position; "
        "deeper ones to textures and parts, on ever coarser grids."
    ),
    code(
        "from fmtransfer.analysis import pictures as P\n\n"
        "model = an.ctx.spec.create()[0].eval()\n"
        "photo, maps, caption = P.photo_maps(an, model)\n"
        'display(Markdown(f"Photo: {caption}"))\n'
        "for name, m in maps.items():\n"
        '    show(activation_grid(m, photo, 12, f"{name}: {m.shape[0]} channels at {m.shape[1]}x{m.shape[2]}"))'
    ),
    md(
        "## First-layer filters\n\nThe first convolution's filters as colour patches: the oriented edge, colour "
        "blob and colour-opponent detectors every ImageNet network learns first."
    ),
    code(
        "from fmtransfer.analysis.visualise import first_layer_filters\n\n"
        "show(filters_figure(first_layer_filters(model)))"
    ),
    md(
        "## Activation maximisation\n\nFor the most active channels of a few levels (on the training split), an "
        "input optimised to drive that channel up (gradient ascent on the pixels with jitter, scaling and blur as "
        "regularisers, the backbone frozen). What a channel *wants* to see, not what a dataset image shows."
    ),
    code(
        "levels = [n for n in a.max_levels if n in spatial]\n"
        "rows, titles = P.maximisation_rows(an, model, levels, a.max_channels, a.max_size, a.max_steps, seed=0)\n"
        'show(image_rows_figure(rows, titles, f"activation maximisation ({a.max_size} px, {a.max_steps} steps)"))'
    ),
    md(
        "## Top-activating patches\n\nFor a few channels, the training images in which they fire most, cropped "
        "around the peak at the level's measured receptive field (Zeiler & Fergus). Read from the cache when it "
        "stores the level at full resolution, else from one live pass over the split; the caption says which."
    ),
    code(
        "for level in [n for n in a.patch_levels if n in spatial]:\n"
        "    channels = P.most_active_channels(an, level, a.patch_channels)\n"
        "    rows, titles, source = P.patch_rows(an, model, level, channels, a.patch_k)\n"
        '    display(Markdown(f"**{level}**: maps from {source}"))\n'
        '    show(image_rows_figure(rows, titles, f"top-activating patches at {level}"))'
    ),
    md(
        "## Where a classifier on these features looks\n\nGrad-CAM at a deep level and occlusion sensitivity, for a "
        "linear probe on the frozen pre-logits (fitted on train, selected on validation)."
    ),
    code(
        "cam_level = a.cam_level if a.cam_level in spatial else spatial[-1]\n"
        "img, cam, occ = A.saliency_maps(an, A.frozen_classifier(an), cam_level, a.eval_split, a.images[0])\n"
        'show(saliency_figure(img, cam, occ, f"Grad-CAM at {cam_level}"))'
    ),
]
nb = nbf.v4.new_notebook(
    cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
)
Path(__file__).with_name("feature_maps.ipynb").write_text(nbf.writes(nb))
