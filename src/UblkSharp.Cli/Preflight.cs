using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Cli;

/// <summary>Checks that give a clear message before any work starts.</summary>
internal static class Preflight
{
    /// <summary>For what only root may do (mounting, the service): the driver, and root.</summary>
    public static void RequireRootAndDriver()
    {
        RequireDriverPresent();
        if (!Processes.IsRoot)
        {
            throw new UnauthorizedAccessException("this needs root: run ublksharp as root");
        }
    }

    /// <summary>
    /// For device commands: root, or a user the machine lets add devices of their own
    /// (UNPRIVILEGED_DEV: /dev/ublk-control open to them, as the udev rule of setup-unprivileged makes it).
    /// </summary>
    public static void RequireDriver()
    {
        RequireDriverPresent();
        if (!Processes.IsRoot && !Processes.MayReadWrite(ControlDevice.Path))
        {
            throw new UnauthorizedAccessException(
                $"ublk devices need root, or a {ControlDevice.Path} open to users: run ublksharp as root, or have root run 'ublksharp setup-unprivileged' once, which lets every user add and serve devices of their own");
        }
    }

    private static void RequireDriverPresent()
    {
        if (!File.Exists(ControlDevice.Path))
        {
            throw new UblkUnavailableException(
                $"{ControlDevice.Path} does not exist: this kernel has no ublk driver loaded. Try 'modprobe ublk_drv' (Linux 6.0+ with CONFIG_BLK_DEV_UBLK), " +
                "or, from a source checkout, run ublksharp inside tools/ublksharp-vm, which boots a kernel that has it.");
        }
    }
}
