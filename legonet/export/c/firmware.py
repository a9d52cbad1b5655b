"""A Cortex-M7 build of the exported C, run on the emulated MPS2-AN500 board, and a host build.

The export writes, beside model.c: ``firmware_main.c`` (images in and logits out over semihosting,
the ticks of the board's timer around each inference), ``firmware_startup.c`` (vector table and
reset handler), ``mps2_an500.ld`` (the board's memory map; weights and arena go to the 16 MB PSRAM
when they do not fit the SSRAMs) and a Makefile with the same commands as the functions below.

Instruction counts: the M7's DWT cycle counter is not emulated, and qemu's semihosting clocks
(``SYS_CLOCK``, ``SYS_ELAPSED``) read the host's time. Under ``-icount shift=0`` qemu's virtual
clock advances exactly 1 ns per instruction executed, and the board's CMSDK timer runs on that clock
(25 MHz: one tick per 40 instructions). The firmware reads the timer around ``legonet_infer`` and
around a loop of known length (calibration); ``instructions = ticks x calibration instructions /
calibration ticks``, to within 40 instructions. These are instructions, not cycles: qemu does not
model the M7's pipeline, caches or memory wait states.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from legonet.errors import LegoError

HOST_FLAGS = ("-std=c99", "-Wall", "-Werror")
ARM_FLAGS = ("-mcpu=cortex-m7", "-mthumb", "-mfpu=fpv5-d16", "-mfloat-abi=hard", "-std=c99", "-Wall", "-Werror",
             "-ffunction-sections", "-fdata-sections")
ARM_LINK = ("--specs=rdimon.specs", "-nostartfiles", "-T", "mps2_an500.ld", "-Wl,--gc-sections")
QEMU_ARGS = ("-M", "mps2-an500", "-nographic", "-monitor", "none", "-serial", "none",
             "-semihosting-config", "enable=on,target=native", "-icount", "shift=0")
FIRMWARE_SOURCES = ("firmware_startup.c", "firmware_main.c", "model.c")
# the files firmware_files() writes beside the model
FIRMWARE_FILES = ("firmware_main.c", "firmware_startup.c", "mps2_an500.ld", "Makefile")
# the linker script, with @WEIGHTS@ and @ARENA@ the regions chosen for the weights and the arena
LINKER_SCRIPT = """/* MPS2-AN500 (Cortex-M7) memory map as qemu-system-arm -M mps2-an500 emulates it: 4 MB ZBT SSRAM1
 * at 0 (code, the vector table at its start), 4 MB ZBT SSRAM2/3 at 0x20000000 (data, stack), 16 MB
 * PSRAM at 0x60000000. The weights (.rodata.lgd_*) and the activation arena (.bss.lgb_arena) go to
 * @WEIGHTS@ and @ARENA@: the PSRAM when they do not fit beside the rest. */
MEMORY
{
  SSRAM1 (rx) : ORIGIN = 0x00000000, LENGTH = 4M
  SSRAM23 (rwx) : ORIGIN = 0x20000000, LENGTH = 4M
  PSRAM (rwx) : ORIGIN = 0x60000000, LENGTH = 16M
}
ENTRY(Reset_Handler)
SECTIONS
{
  .vectors : { KEEP(*(.isr_vector)) } > SSRAM1
  .weights : { *(.rodata.lgd_*) . = ALIGN(4); } > @WEIGHTS@
  .text : { *(.text*) *(.rodata*) KEEP(*(.init)) KEEP(*(.fini)) . = ALIGN(4); } > SSRAM1
  .ARM.exidx : { *(.ARM.exidx*) } > SSRAM1
  __data_load__ = LOADADDR(.data);
  .data : { __data_start__ = .; *(.data*) . = ALIGN(4); __data_end__ = .; } > SSRAM23 AT > SSRAM1
  .arena (NOLOAD) : { __arena_start__ = .; *(.bss.lgb_arena) . = ALIGN(4); __arena_end__ = .; } > @ARENA@
  .bss (NOLOAD) : { __bss_start__ = .; *(.bss*) *(COMMON) . = ALIGN(4); __bss_end__ = .; } > SSRAM23
  end = .;
  __end__ = .;
  __StackTop = ORIGIN(SSRAM23) + LENGTH(SSRAM23);
}
"""
# room left in each SSRAM for code, newlib, stack and heap before weights / arena move to the PSRAM
_SSRAM = 4 << 20
_HEADROOM = 512 << 10


def _template(name: str) -> str:
    return (resources.files("legonet.export.c") / "templates" / name).read_text()


def firmware_files(info) -> dict[str, str]:
    """``{file name: text}`` of the firmware for an export of :class:`~legonet.export.c.ExportInfo` ``info``."""
    weights = "SSRAM1" if info.flash_bytes + _HEADROOM <= _SSRAM else "PSRAM"
    arena = "SSRAM23" if info.ram_bytes + _HEADROOM <= _SSRAM else "PSRAM"
    if weights == arena == "PSRAM" and info.flash_bytes + info.ram_bytes > 16 << 20:
        raise LegoError(f"C export: weights ({info.flash_bytes:,} B) and arena ({info.ram_bytes:,} B) exceed the "
                        "emulated board's 24 MB of RAM")
    makefile = f"""# Host build: make host && ./model < images.raw (uint8 HWC images in, one line of outputs each)
# Cortex-M7 build (arm-none-eabi-gcc, newlib) and run under qemu-system-arm (reads input.bin, writes
# logits.bin and ticks.txt in the current folder): make m7 && make run-m7
CC ?= gcc
ARM_CC ?= arm-none-eabi-gcc
OPT ?= -O2
CFLAGS = {' '.join(HOST_FLAGS)} $(OPT)
ARM_FLAGS = {' '.join(ARM_FLAGS)} $(OPT)

host: model
model: model.c main.c model.h
\t$(CC) $(CFLAGS) -o $@ model.c main.c -lm
m7: firmware.elf
firmware.elf: {' '.join(FIRMWARE_SOURCES)} model.h mps2_an500.ld
\t$(ARM_CC) $(ARM_FLAGS) {' '.join(ARM_LINK)} -o $@ {' '.join(FIRMWARE_SOURCES)} -lm
run-m7: firmware.elf
\tqemu-system-arm {' '.join(QEMU_ARGS)} -kernel firmware.elf
.PHONY: host m7 run-m7
"""
    return {"firmware_main.c": _template("firmware_main.c"), "firmware_startup.c": _template("firmware_startup.c"),
            "mps2_an500.ld": LINKER_SCRIPT.replace("@WEIGHTS@", weights).replace("@ARENA@", arena),
            "Makefile": makefile}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LegoError(f"{name} not found (Debian: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi "
                        "qemu-system-arm gcc)")
    return path


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, **kw)
    if done.returncode != 0:
        err = (done.stderr or b"").decode(errors="replace").strip().splitlines()
        first = next((line for line in err if "error" in line.lower()), err[0] if err else "no message")
        raise LegoError(f"{what} failed (exit {done.returncode}): {first.strip()}")
    return done


def build_host(folder: str | Path, opt: str = "-O2", cc: str = "gcc") -> Path:
    """Compile model.c + main.c in ``folder`` for this machine; returns the executable."""
    folder = Path(folder)
    exe = folder / "model"
    _run([_tool(cc), *HOST_FLAGS, opt, "-o", str(exe), str(folder / "model.c"), str(folder / "main.c"), "-lm"],
         f"{cc} on {folder / 'model.c'}")
    return exe


def run_host(exe: str | Path, images: np.ndarray, timeout: float = 600) -> np.ndarray:
    """Outputs ``(N, outputs)`` float32 of the host executable on uint8 ``images`` ``(N, H, W, C)``."""
    done = _run([str(exe)], f"{exe}", input=np.ascontiguousarray(images, dtype=np.uint8).tobytes(), timeout=timeout)
    return np.array([[float(v) for v in line.split()] for line in done.stdout.decode().splitlines()], dtype=np.float32)


def build_firmware(folder: str | Path, opt: str = "-O2") -> Path:
    """Compile the Cortex-M7 firmware in ``folder`` (arm-none-eabi-gcc, newlib rdimon); returns the ELF."""
    folder = Path(folder)
    elf = folder / "firmware.elf"
    _run([_tool("arm-none-eabi-gcc"), *ARM_FLAGS, opt, *ARM_LINK, "-o", elf.name, *FIRMWARE_SOURCES, "-lm"],
         f"arm-none-eabi-gcc in {folder}", cwd=folder)
    return elf


def arm_size(elf: str | Path) -> dict[str, int]:
    """``{"text", "data", "bss"}`` bytes of ``elf`` by ``arm-none-eabi-size`` (Berkeley format)."""
    out = _run([_tool("arm-none-eabi-size"), str(elf)], "arm-none-eabi-size").stdout.decode().splitlines()[1].split()
    return {"text": int(out[0]), "data": int(out[1]), "bss": int(out[2])}


@dataclass(frozen=True)
class EmulatedRun:
    """Outputs ``(N, outputs)`` float32 and instructions per inference of a run under qemu."""

    logits: np.ndarray
    instructions: tuple[int, ...]
    instructions_per_tick: float


def run_firmware(elf: str | Path, images: np.ndarray, outputs: int, timeout: float = 600) -> EmulatedRun:
    """Run the firmware ``elf`` under ``qemu-system-arm -M mps2-an500 -icount shift=0`` on uint8
    ``images`` ``(N, H, W, C)``; ``outputs`` floats per image."""
    qemu = _tool("qemu-system-arm")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "input.bin").write_bytes(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        _run([qemu, *QEMU_ARGS, "-kernel", str(Path(elf).resolve())], "qemu-system-arm", cwd=work, timeout=timeout)
        logits = np.fromfile(work / "logits.bin", dtype="<f4").reshape(-1, outputs)
        lines = (work / "ticks.txt").read_text().split("\n")
    cal_ticks, cal_instructions = (int(v) for v in lines[0].split())
    per_tick = cal_instructions / cal_ticks
    ticks = [int(v) for v in lines[1:] if v.strip()]
    if len(ticks) != len(images) or logits.shape[0] != len(images):
        raise LegoError(f"the emulated run processed {logits.shape[0]} of {len(images)} images")
    return EmulatedRun(logits, tuple(round(t * per_tick) for t in ticks), per_tick)
