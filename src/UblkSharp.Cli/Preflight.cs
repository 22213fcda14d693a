using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Cli;

/// <summary>Checks that give a clear message before any work starts.</summary>
internal static class Preflight
{
    public static void RequireRootAndDriver()
    {
        if (!File.Exists(ControlDevice.Path))
        {
            throw new UblkUnavailableException(
                $"{ControlDevice.Path} does not exist: this kernel has no ublk driver loaded. Try 'modprobe ublk_drv' (Linux 6.0+ with CONFIG_BLK_DEV_UBLK), " +
                "or, from a source checkout, run ublksharp inside tools/ublksharp-vm, which boots a kernel that has it.");
        }
        if (!Processes.IsRoot)
        {
            throw new UnauthorizedAccessException("ublk devices need root (CAP_SYS_ADMIN): run ublksharp as root");
        }
    }
}
