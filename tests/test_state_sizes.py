"""Per-task state files at the papers' scale: ViT-B/16, rank 10, 10 or 20 classes per task (the official
code, liangyanshuo/InfLoRA, saves ≈445 MB per task)."""
import timm
import torch

from ifcl.steps.inflora import save_memory
from ifcl.methods.inflora import LayerMemory
from ifcl.models.vit_lora import ViTLoRA, random_reduction, reduction_state
from ifcl.state import load_state, save_state

MB = 1e6


def vit_b16_widths():
    """ViT-B/16's blocks (width 768, depth 12, 12 heads) on 32-px images: the same per-task tensors as at 224 px
    (what a task adds depends on the widths, not on the number of tokens), its statistics pass 50 times cheaper."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)


def test_reduction_and_adapter_of_a_vit_b16_task_take_under_2_mb(tmp_path):
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = ViTLoRA(vit, rank=10)
    gen = torch.Generator().manual_seed(0)
    downs = [random_reduction(768, 10, gen) for _ in model.lora_blocks]
    model.begin_task(downs, downs, num_classes=20)
    save_state(tmp_path / "reduction.safetensors", reduction_state(model.lora_blocks, downs, downs), {"kind": "reduction"})
    save_state(tmp_path / "adapter.safetensors", model.current_adapter_state(), {"kind": "adapter"})
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    # 12 blocks x (k, v) x 10 x 768 float32 = 737,280 bytes each, plus a 20 x 768 head in the adapter
    assert 737_280 < sizes["reduction.safetensors"] < 760_000
    assert 737_280 + 20 * 769 * 4 < sizes["adapter.safetensors"] < 820_000
    assert sum(sizes.values()) < 2 * MB
    tensors, _ = load_state(tmp_path / "adapter.safetensors")
    assert sum(t.numel() for t in tensors.values()) == 12 * 2 * 768 * 10 + 20 * 769


def test_memory_file_size_follows_its_columns(tmp_path):
    """The memory stores, per layer, the old-space basis (remove) or, with DualGPM, its complement (retain) when
    that is smaller: at most 384 columns of 768 floats with DualGPM, 768 with GPM (28.3 MB over 12 blocks). With
    the first-task sizes of the official ImageNet-R log that is 1.1 MB."""
    columns = [7, 11, 14, 19, 28, 26, 30, 31, 50, 60, 28, 81]
    memories = [LayerMemory(torch.linalg.qr(torch.randn(768, m))[0], "remove") for m in columns]
    save_memory(tmp_path / "memory.safetensors", list(range(12)), memories, {"task": 0})
    size = (tmp_path / "memory.safetensors").stat().st_size
    assert sum(columns) * 768 * 4 < size < sum(columns) * 768 * 4 + 20_000
    full = [LayerMemory(torch.eye(768), "remove") for _ in range(12)]  # GPM, every direction kept
    save_memory(tmp_path / "full.safetensors", list(range(12)), full, {"task": 9})
    assert 28.3 * MB < (tmp_path / "full.safetensors").stat().st_size < 28.3 * MB + 20_000


def test_compared_methods_task_files_at_vit_b16(tmp_path):
    """docs/methods.md's per-task sizes (10 classes per task, the paper configs' pools): L2P 1.97 MB, DualPrompt
    2.0 MB, CODA-Prompt 15.4 MB (the whole pool is in each task's file), SD-LoRA 1.5 MB."""
    from ifcl.methods.prompts import build_pool
    from ifcl.models.vit_sdlora import ViTSDLoRA

    head = {"head.weight": torch.zeros(10, 768), "head.bias": torch.zeros(10)}
    pools = {"l2p": {"pool_size": 30, "length": 20, "layers": [0], "top_k": 5, "key_loss": "official"},
             "dualprompt": {"pool_size": 10, "length": 20, "layers": [2, 3, 4], "g_length": 6, "g_layers": [0, 1]},
             "coda-prompt": {"pool_size": 100, "length": 8, "layers": [0, 1, 2, 3, 4], "ortho_mu": 0.0}}
    sizes = {}
    for method, settings in pools.items():
        pool = build_pool(method, settings, 768, 10, torch.Generator().manual_seed(0))
        save_state(tmp_path / f"{method}.safetensors", {**{f"pool.{k}": v for k, v in pool.state().items()}, **head},
                   {"kind": "task_state"})
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    model = ViTSDLoRA(vit, rank=10)
    model.begin_task(10, 0, torch.Generator().manual_seed(0))
    save_state(tmp_path / "sd-lora.safetensors", model.task_state(), {"kind": "task_state"})
    sizes = {p.stem: round(p.stat().st_size / MB, 2) for p in tmp_path.iterdir()}
    assert sizes == {"l2p": 1.97, "dualprompt": 2.0, "coda-prompt": 15.39, "sd-lora": 1.51}


def test_lae_task_files_at_vit_b16(tmp_path):
    """docs/methods.md: LAE's task file holds head t and the adapters of blocks 0-4 after the task, online (task 0:
    0.20 MB with a 10-class head) and, from task 1, offline too (0.37 MB)."""
    from ifcl.models.vit_lae import ViTLAE

    model = ViTLAE(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0))
    gen = torch.Generator().manual_seed(0)
    for t in range(2):
        model.begin_task(10, t, gen)
        save_state(tmp_path / f"task{t}.safetensors", model.task_state(), {"kind": "task_state"})
    sizes = [round((tmp_path / f"task{t}.safetensors").stat().st_size / MB, 2) for t in range(2)]
    assert sizes == [0.20, 0.37]
    adapter = 768 * 5 + 5 + 5 * 768 + 768 + 1  # down, its bias, up, its bias, the scale
    assert sum(v.numel() for v in model.task_state().values()) == 10 * 769 + 2 * 5 * adapter


def test_clora_task_file_at_vit_b16(tmp_path):
    """docs/methods.md: C-LoRA's task file holds task t's rank-10 factors on k and v of the 12 blocks and head t:
    1.51 MB with 10 classes."""
    from ifcl.models.vit_clora import ViTCLoRA

    model = ViTCLoRA(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), rank=10)
    model.begin_task(10, 0, torch.Generator().manual_seed(0))
    save_state(tmp_path / "task0.safetensors", model.task_state(), {"kind": "task_state"})
    assert round((tmp_path / "task0.safetensors").stat().st_size / MB, 2) == 1.51
    assert sum(v.numel() for v in model.task_state().values()) == 12 * 2 * 2 * 10 * 768 + 10 * 769


def test_ease_task_file_at_vit_b16(tmp_path):
    """docs/methods.md: EASE's task file holds task t's adapters (width 64 beside the MLP of the 12 blocks), its
    training head and its classes' prototypes: 4.82 MB at task 0 with 10 classes."""
    from ifcl.models.vit_ease import ViTEASE

    model = ViTEASE(vit_b16_widths())
    model.begin_task(10, 0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.finish_task([(torch.rand(10, 3, 32, 32), torch.arange(10))], 0)  # one image per class
    state = model.task_state()
    save_state(tmp_path / "task0.safetensors", state, {"kind": "task_state"})
    assert round((tmp_path / "task0.safetensors").stat().st_size / MB, 2) == 4.82
    assert sum(v.numel() for k, v in state.items() if k.startswith("blocks.")) == 12 * (768 * 64 + 64 + 64 * 768 + 768)


def test_mos_task_file_at_vit_b16(tmp_path):
    """docs/methods.md: MOS's task file holds the adapter after task t (width 16 beside the 12 MLPs, 1.22 MB), the
    head and its classes' prototypes, means and covariances: 24.9 MB with 10 classes (2.36 MB a covariance)."""
    from ifcl.models.vit_mos import ViTMOS

    model = ViTMOS(vit_b16_widths(), statistics_batch_size=20)
    model.begin_task(10, 0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.finish_task([(torch.rand(20, 3, 32, 32), torch.arange(10).repeat(2))], 0)  # two images per class
    save_state(tmp_path / "task0.safetensors", model.task_state(), {"kind": "task_state"})
    assert round((tmp_path / "task0.safetensors").stat().st_size / MB, 1) == 24.9


def test_hide_prompt_task_file_at_vit_b16(tmp_path):
    """docs/methods.md: HiDe-Prompt's task file holds the task's prompt, the task-identity model (its MLP changes every
    task), the heads and the classes' centroid statistics: 12.13 MB at task 0 of CIFAR-100 (length 5, 10 classes)."""
    import dataclasses

    from ifcl.catalog.hide_prompt import Alignment, TaskIdentity
    from ifcl.models.vit_hide_prompt import HiDePromptViT

    prompt = {"length": 5, "layers": [0, 1, 2, 3, 4], "momentum": 0.01, "contrastive": 0.1, "temperature": 0.8,
              "layout": "official", "devices": 1, "device_batch": 24}
    model = HiDePromptViT(vit_b16_widths(), prompt=prompt, tii={**dataclasses.asdict(TaskIdentity()), "epochs": 1},
                          tii_alignment=dataclasses.asdict(Alignment(lr=0.005, samples=24)),
                          alignment=dataclasses.asdict(Alignment(lr=0.005, samples=120)), centroids=10)
    model.begin_task(10, 0, torch.Generator().manual_seed(0))
    batches = [(torch.rand(100, 3, 32, 32), torch.arange(10).repeat(10))]  # ten images a class: ten centroids
    model.finish_task(batches, 0, batches)
    save_state(tmp_path / "task0.safetensors", model.task_state(), {"kind": "task_state"})
    assert round((tmp_path / "task0.safetensors").stat().st_size / MB, 2) == 12.13


def test_ranpac_task_state_at_vit_b16_is_its_gram_matrix():
    """docs/methods.md: RanPAC's task file holds G [M, M] (400 MB at M = 10000), Q and the head (0.8 MB per 10
    classes seen) and, in task 0's file, the projection W [768, M] (30.7 MB); counted from the tensors the task
    state holds (writing 430 MB would only slow the suite)."""
    from timm.models.vision_transformer import VisionTransformer

    from ifcl.models.vit_ranpac import RanPACViT

    vit = VisionTransformer(embed_dim=768, depth=1, num_heads=12, num_classes=0)  # ViT-B/16's width, one block
    model = RanPACViT(vit, width=10000, generator=torch.Generator().manual_seed(0))
    model.begin_task(10, 0)
    model.prototypes, model.weight, model.ridge = torch.zeros(10000, 10), torch.zeros(10, 10000), 1.0
    sizes = {name: t.numel() * t.element_size() / MB for name, t in model.task_state().items()}
    assert sizes["gram"] == 400.0 and sizes["projection"] == 30.72
    assert sizes["prototypes"] + sizes["weight"] == 0.8


def test_moe_adapters_task_files_at_vit_b16():
    """docs/methods.md: MoE-Adapters' state after task t holds every expert (22 per block of both towers, 174.5 MB),
    the routers of tasks 0..t (2.7 MB each) and the frozen experts' masks: 177.2 MB after task 0, 204.2 MB after
    task 10; each DDAS autoencoder 34.8 MB (counted from the tensors; writing them would only slow the suite)."""
    import open_clip

    from ifcl.methods.moe_adapters import DDASAutoencoder
    from ifcl.models.clip_moe import CLIPMoE
    from ifcl.steps.moe_adapters import moe_state

    model = CLIPMoE(open_clip.create_model("ViT-B-16", force_quick_gelu=True))  # 22 experts, 11 router slots
    sizes = {t: sum(v.numel() * v.element_size() for v in moe_state(model, t, {}).values()) / MB for t in (0, 10)}
    experts = sum(v.numel() * v.element_size() for v in model.expert_state().values()) / MB
    router = sum(v.numel() * v.element_size() for v in model.router_state(0).values()) / MB
    assert (round(experts, 2), round(router, 2)) == (174.5, 2.7)
    assert (round(sizes[0], 1), round(sizes[10], 1)) == (177.2, 204.2)
    assert model.parameter_count(1) == 44_301_312  # trained in task 0: every expert and one task's routers
    ae = DDASAutoencoder()
    assert round(sum(v.numel() * v.element_size() for v in ae.state_dict().values()) / MB, 1) == 34.8
