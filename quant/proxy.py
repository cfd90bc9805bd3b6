"""What ComfyUI patches in for a quantized tower: a proxy that computes with the quantized tower and, to
ComfyUI's weight machinery, looks like the original one.

ComfyUI's patchers walk the model by name. v0.29's dynamic-VRAM patcher backs up parameters by name and writes
the backups back by name on the next load, with the object patches already applied; a module tree holding the
quantized tower would get unquantized weights written into it (or crash on names it lacks). So the quantized
tower lives outside the module tree (not a submodule: invisible to .to()/named_*()), places itself on the
device it runs on and goes back to the offload device when ComfyUI unloads the model (or, where ComfyUI would
not, when another model's tower runs), while weight names (state_dict, attribute paths such as
`text_model.encoder...`) resolve to the original tower: backups land where they came from, a LoRA loaded onto
the quantized CLIP finds its keys (and `RefuseLaterWeightPatches` then stops it with the fix, instead of
ComfyUI dropping it with a few warnings), and CLIPSave writes the original tower, never FP8 codes without
their scales.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

from .vram import holders, make_room, tensor_bytes

# Proxies whose tower sits on its load device. ComfyUI does not count that memory as weights it can move, so a
# tower stays there only while ComfyUI will send it back itself (see `_comfy_unloads`); other towers go back when
# another model's tower runs, which leaves one model's towers (SDXL's CLIP-L and CLIP-G together) at a time.
_RESIDENT: "weakref.WeakSet[TowerProxy]" = weakref.WeakSet()

_UNSET = object()

# Roots of the weight names of CLIP towers: they resolve to the original tower.
WEIGHT_ROOTS = frozenset({"text_model", "text_projection", "embeddings", "encoder", "pre_layrnorm",
                          "post_layernorm", "visual_projection"})


class WeightPatchAfterQuantization(RuntimeError):
    pass


def _free_device_memory(impl: torch.nn.Module) -> None:
    """What a tower holds on the GPU besides its weights (captured CUDA graphs, a TensorRT engine): it goes
    with an unload, and is made again on the next encode. The weights' own moves (host copies swapped back)
    do not call the tower's .to(), so the tower is told."""
    free = getattr(impl, "free_device_memory", None)
    if free is not None:
        free()


class TowerProxy(torch.nn.Module):
    def __init__(self, impl: torch.nn.Module, original: torch.nn.Module, load_device: Any, offload_device: Any,
                 group: object | None = None):
        """`group`: the same object for the towers of one CLIP, which run one after another in every encode
        and so share the GPU; a tower of another group running sends them back to the offload device unless
        ComfyUI will (`_comfy_unloads`)."""
        super().__init__()
        # object.__setattr__: not registered as submodules, so invisible to .to()/named_*().
        object.__setattr__(self, "group", group if group is not None else object())
        object.__setattr__(self, "impl", impl)
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "load_device", torch.device(load_device))
        object.__setattr__(self, "offload_device", torch.device(offload_device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._to_load_device()
        return self.impl(*args, **kwargs)

    def _to_load_device(self) -> None:
        held = holders(self)  # the clone ComfyUI loaded to run now: its devices
        if held:
            self.retarget(held[0].load_device, held[0].offload_device)
        if self.load_device != self.offload_device and self not in _RESIDENT:
            for other in list(_RESIDENT):  # a tower another model left on the GPU (see offload)
                if other.group is not self.group and other.impl is not self.impl and not _comfy_unloads(other):
                    other.offload_now()
            _RESIDENT.add(self)
        self.place(self.load_device)

    def place(self, device: torch.device) -> None:
        impl = self.impl
        p = next(impl.parameters(), None)
        if p is None or p.device == device or (device.type == "cuda" and p.device.type == "cuda"
                                               and device.index is None):
            if device == self.offload_device != self.load_device:  # an unload: its weights are there already,
                _free_device_memory(impl)  # not what else it holds on the GPU
            return
        # Moved tensors keep their kind. ComfyUI unloads outside inference mode (/free, "Unload Models"): a
        # tower that came back as normal tensors, indexed with inference ones in the next encode, failed with
        # "Inference tensors do not track version counter" (ComfyUI v0.29 server, H100).
        with torch.inference_mode(p.is_inference()):
            self._move(impl, p, device)
        if device == self.offload_device:
            _free_device_memory(impl)

    def _move(self, impl: torch.nn.Module, p: torch.Tensor, device: torch.device) -> None:
        host = impl.__dict__.get(_HOST)
        if device == self.offload_device and host is not None:
            if host.restore(impl):
                return
            host.release()  # the tower's structure changed since: move it the ordinary way
            del impl.__dict__[_HOST]
        elif device == self.load_device and p.device == self.offload_device:
            if not _final(impl):  # a calibration copy: its scales and weights change on the GPU, keep no copy
                if host is not None:
                    host.release()
                    del impl.__dict__[_HOST]
            elif host is None or not host.holds(impl):
                if host is not None:
                    host.release()
                impl.__dict__[_HOST] = HostCopy(impl)
            make_room(tensor_bytes(impl), device, holders(self))
            impl.to(device, non_blocking=True)  # ordered before the kernels that use it (same stream)
            return
        impl.to(device)

    def retarget(self, load_device: Any, offload_device: Any) -> None:
        """Follow the devices of the clone ComfyUI loaded: a clone made to run elsewhere (v0.29's Select CLIP
        Device: the CPU, another GPU) shares this proxy, which kept the devices of the clone it was made for,
        so the tower ran and stayed on the old GPU, where no loaded model accounted for it. (ComfyUI does not
        call a load callback for it when the model is loaded already: the clone's devices are read at the run.)"""
        load, offload = torch.device(load_device), torch.device(offload_device)
        if (load, offload) == (self.load_device, self.offload_device):
            return
        if self in _RESIDENT:  # leave the old load device first
            self.offload_now()
        object.__setattr__(self, "load_device", load)
        object.__setattr__(self, "offload_device", offload)
        if getattr(self.impl, "load_device", None) is not None:  # the FP8 model places itself there at each call
            self.impl.load_device = load

    def offload(self, patcher: Any = None, unpatch_all: bool = True, *args: Any, **kwargs: Any) -> None:
        """ON_DETACH callback. Only a full unload frees the tower: v0.29 detaches (unpatch_all=False) every
        clone of a model before each load, the clone about to run again included, and keeps their weights
        where they are; moving the tower then would cost a copy and a CUDA-graph capture per encode."""
        if unpatch_all:
            self.offload_now()

    def offload_now(self) -> None:
        _RESIDENT.discard(self)
        if self.offload_device != self.load_device:
            self.place(self.offload_device)
        else:  # --gpu-only: the tower stays, but an unload still frees what its CUDA graphs hold
            _free_device_memory(self.impl)

    def _apply(self, fn: Any, recurse: bool = True) -> "TowerProxy":
        """Module.to() of the model holding this proxy (which has no tensors of its own). ComfyUI moves the whole
        model to the offload device, with this proxy still patched in, when a clone with other weights (the
        original CLIP this one was quantized from) loads in its place: the only sign that ComfyUI dropped this
        clone without a full unload, after which nothing else, "Unload Models" included, would send the tower
        back. The same clone running again moves nothing."""
        if self in _RESIDENT and self.load_device != self.offload_device:
            target = None
            # where a tensor on the load device would go (a dtype cast, .half(), leaves it there); a 'meta'
            # stand-in cannot be copied out, so a CPU tensor answers for it
            for probe in (self.load_device, torch.device("cpu")):
                try:
                    target = fn(torch.empty(0, device=probe)).device
                    break
                except Exception:  # noqa: BLE001 - not a tensor function: nothing to follow
                    continue
            if target == self.offload_device:
                self.offload_now()
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The original tower's state_dict. v0.29's dynamic-VRAM loader sizes the CLIP's modules from their
        state_dicts on every encode (comfy.model_management.module_size), and torch's recursive walk of
        CLIP-G's ~360 modules cost more than its FP8 transformer (2.2 ms per SDXL encode on an H200); the same
        dict is built from a list made once."""
        entries = None if args else self.__dict__.get("_sd_entries", _UNSET)
        if entries is _UNSET:
            entries = self.__dict__["_sd_entries"] = _state_dict_entries(self.original)
        if entries is None:
            return self.original.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        meta = getattr(out, "_metadata", None)
        if meta is None and destination is None:
            meta = out._metadata = OrderedDict()
        for mod, mprefix, params, buffers in entries:
            if meta is not None:
                meta[(prefix + mprefix)[:-1]] = {"version": mod._version}
            for name in params:
                t = mod._parameters.get(name)  # read now: ComfyUI replaces parameters by name
                if t is not None:
                    out[prefix + mprefix + name] = t if keep_vars else t.detach()
            for name in buffers:
                t = mod._buffers.get(name)
                if t is not None and name not in mod._non_persistent_buffers_set:
                    out[prefix + mprefix + name] = t if keep_vars else t.detach()
        return out

    def get_input_embeddings(self) -> torch.nn.Module:
        """ComfyUI looks the tokens up with this table before calling the tower, on the device of its weight
        (v0.3.x) or the load device (v0.29): the tower goes there first, so that a tower ComfyUI unloaded does
        not run its first encode on the CPU or copy its whole table to the GPU for one lookup."""
        self._to_load_device()
        return self.impl.get_input_embeddings()

    def set_input_embeddings(self, embeddings: torch.nn.Module) -> None:
        self.impl.set_input_embeddings(embeddings)

    def __getattr__(self, name: str) -> Any:
        if name in WEIGHT_ROOTS and "original" in self.__dict__:
            return getattr(self.__dict__["original"], name)
        try:
            return super().__getattr__(name)
        except AttributeError:
            impl = self.__dict__.get("impl")
            if impl is None:
                raise
            return getattr(impl, name)


def load_towers(patcher: Any, paths: Any, grow: int = 1) -> None:
    """Put the towers patched in at `paths` on their load device, as their first encode would, with room made
    for `grow` times their size (2: cast to fp32 there). A remembered calibration is rebuilt with no encode: its
    weight checks, fp32 cast, quantizers, weight folding and FP8 conversion ran on the offload device, the CPU
    (ViT-H: 12 s through ComfyUI's server with one CPU thread, bench/results/http_server_gpu.md)."""
    for proxy in patched_proxies(patcher, paths):
        if grow > 1 and proxy.load_device != proxy.offload_device:
            make_room(grow * tensor_bytes(proxy.impl), proxy.load_device, holders(proxy))
        proxy._to_load_device()


def drop_towers(patcher: Any, paths: Any) -> None:
    """Let go of the private towers patched in at `paths` that will not run again: a calibration copy once its
    FP8 model is built and its reference outputs taken. Left resident, the FP8 tower's first run sent it back to
    the CPU (ViT-H in fp32: 1.8 s on an H200) just before it was freed. The clone keeps no quantized tower."""
    for proxy in patched_proxies(patcher, paths):
        _RESIDENT.discard(proxy)
        object.__setattr__(proxy, "impl", torch.nn.Module())  # no parameters: nothing to place or run


def patched_proxies(patcher: Any, paths: Any) -> list[TowerProxy]:
    """The tower proxies a clone's patcher swaps in at `paths` (skipping paths it does not patch)."""
    return [p for p in (patcher.object_patches.get(path) for path in paths) if isinstance(p, TowerProxy)]


def _final(impl: torch.nn.Module) -> bool:
    """Whether the tower is done changing: calibrated (its record attached) or an FP8 runtime tower."""
    from .artifact import ATTR

    return impl.__dict__.get(ATTR) is not None


def _comfy_unloads(proxy: TowerProxy) -> bool:
    """Whether ComfyUI counts a model holding this tower as loaded, with the static patcher. It then unloads
    that model (ON_DETACH: `offload`) when it needs the memory: it measures free memory on the device, which
    includes the tower. So the tower may stay, as the stock encoder stays loaded beside the others (an unCLIP or
    IP-Adapter workflow's CLIP and CLIP vision: each switch cost 13-18 ms on an H100, bench/results/
    residency_h100.md). Not with v0.29's dynamic VRAM, which does not unload one dynamic model for another, nor
    for a model ComfyUI dropped without a full unload (a clone of the same CLIP loaded in its place)."""
    return any(not getattr(patcher, "is_dynamic", lambda: False)() for patcher in holders(proxy))


def hooked_weights(patcher: Any, path: str) -> list[str]:
    """Weights under `path` that hooks patch (Create Hook LoRA -> Set CLIP Hooks): ComfyUI applies them to the
    module at encode time, in place, which an FP8 tower cannot follow."""
    return [k for group in (getattr(patcher, "hook_patches", None) or {}).values() for k in group
            if k.startswith(path + ".")]


HOOKS_FIX = ("Hooks (Create Hook LoRA -> Set CLIP Hooks) cannot patch FP8 weights: apply the LoRA with 'Load LoRA' "
             "before the Quantize node instead (it is baked into the FP8 weights there), or remove the hooks.")


def refuse_later_weight_patches(patcher: Any, path: str) -> None:
    """A LoRA (or merge, or hook) added after quantization targets weights that now live in FP8 outside the
    model ComfyUI patches: encoding would silently skip it, and so would saving or building an engine. Fail
    with the fix instead."""
    late = [k for k in getattr(patcher, "patches", {}) if k.startswith(path + ".")]
    if late:
        raise WeightPatchAfterQuantization(
            f"{len(late)} weight patches (a LoRA or model merge) were applied to the quantized model, e.g. "
            f"{late[0]}. They cannot be applied to FP8 weights after calibration. Apply LoRAs to the CLIP "
            "before the Quantize node: they are baked into the FP8 weights there.")
    hooked = hooked_weights(patcher, path)
    if hooked:
        raise WeightPatchAfterQuantization(f"{len(hooked)} weights of the quantized model are patched by hooks, "
                                           f"e.g. {hooked[0]}. {HOOKS_FIX}")


class RefuseLaterWeightPatches:
    """ON_LOAD callback: `refuse_later_weight_patches` each time ComfyUI loads the quantized clone."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, patcher: Any, *args: Any, **kwargs: Any) -> None:
        refuse_later_weight_patches(patcher, self.path)


_HOST = "_fp8clip_host_copy"


def _slots(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool, str]]:
    """(owning module, is a parameter, name) of every tensor of `module`."""
    return [(m, is_param, name) for m in module.modules()
            for is_param, d in ((True, m._parameters), (False, m._buffers)) for name, t in d.items()
            if t is not None]


def _tensor(slot: tuple[torch.nn.Module, bool, str]) -> torch.Tensor:
    m, is_param, name = slot
    return m._parameters[name] if is_param else m._buffers[name]


class HostCopy:
    """A tower's tensors on the offload device, kept while it runs on the GPU.

    A quantized tower never changes (a LoRA after quantizing is refused), so sending it back needs no copy:
    its GPU tensors are dropped and these put back. A tower that went back (ComfyUI unloaded its model, or
    another quantized model ran under dynamic VRAM) then costs one host-to-device copy to return instead of a
    copy each way, from memory pinned where ComfyUI allows it (its pinned-memory budget; none with
    --disable-pinned-memory): on an H100, CLIP-L right after a CLIP vision that had sent it back went from 105
    to 13 ms (bench/results/residency_h100.md). The price is the tower's FP8 size in RAM while on the GPU."""

    def __init__(self, module: torch.nn.Module):
        self.slots = _slots(module)
        current = [_tensor(s) for s in self.slots]
        self.tensors = [t.data if isinstance(t, torch.nn.Parameter) else t for t in current]
        pinned = [h for t, h in zip(current, self.tensors) if _pin(t)]  # ComfyUI 0.3 pins Parameters only
        self._finalizer = weakref.finalize(self, _unpin, pinned)
        self._finalizer.atexit = False  # the process is ending: CUDA may be gone, nothing to give back

    def holds(self, module: torch.nn.Module) -> bool:
        """Whether `module` computes with these very tensors now."""
        return _slots(module) == self.slots and all(
            _tensor(s).data_ptr() == h.data_ptr() and _tensor(s).device == h.device
            for s, h in zip(self.slots, self.tensors))

    def restore(self, module: torch.nn.Module) -> bool:
        """Put the host tensors back in place of the GPU ones; False (nothing changed) when the tower's
        structure is no longer the one copied."""
        if _slots(module) != self.slots or any(_tensor(s).shape != h.shape or _tensor(s).dtype != h.dtype
                                               for s, h in zip(self.slots, self.tensors)):
            return False
        for (m, is_param, name), h in zip(self.slots, self.tensors):
            if is_param:
                cur = m._parameters[name]
                if torch._has_compatible_shallow_copy_type(cur, h):  # as Module.to does: same object kept
                    cur.data = h
                else:
                    m._parameters[name] = torch.nn.Parameter(h, requires_grad=cur.requires_grad)
            else:
                m._buffers[name] = h
        return True

    def release(self) -> None:
        self._finalizer()


def _pin(t: torch.Tensor) -> bool:
    if t.device.type != "cpu" or not torch.cuda.is_available():
        return False
    try:
        import comfy.model_management as mm

        return bool(mm.pin_memory(t))
    except Exception:  # noqa: BLE001 - no ComfyUI (command line) or a host without pinning: pageable copies
        return False


def _unpin(tensors: list[torch.Tensor]) -> None:
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    for t in tensors:
        try:
            mm.unpin_memory(t)
        except Exception:  # noqa: BLE001
            pass


def _state_dict_entries(root: torch.nn.Module) -> list | None:
    """(module, its key prefix, parameter names, buffer names) for each module of `root`, in the order
    Module.state_dict visits them; None where that walk does more than collect tensors (a class with its own
    state_dict, as ComfyUI's quantized ops have, extra state or state-dict hooks): then torch's walk is used.
    The tower's structure is fixed once quantized; its tensors are read at each call."""
    base = torch.nn.Module
    entries = []
    for name, mod in root.named_modules(remove_duplicate=False):
        cls = type(mod)
        if (cls.state_dict is not base.state_dict or cls._save_to_state_dict is not base._save_to_state_dict
                or cls.get_extra_state is not base.get_extra_state or mod._state_dict_hooks
                or mod._state_dict_pre_hooks or getattr(mod, "_state_dict_hooks_with_kwargs", None)):
            return None
        entries.append((mod, f"{name}." if name else "", tuple(mod._parameters), tuple(mod._buffers)))
    return entries


def unwrap(obj: Any) -> Any:
    return obj.impl if isinstance(obj, TowerProxy) else obj


def original_of(obj: Any) -> Any:
    """The unquantized module a proxy stands in for (the module itself when it is not a proxy)."""
    return obj.original if isinstance(obj, TowerProxy) else obj
