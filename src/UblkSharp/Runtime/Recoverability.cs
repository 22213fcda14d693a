using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// Whether a device can be recovered: created with recovery, and its daemon died (neither live
/// under a running daemon nor stopped). One place for the refusals, so a command can make them
/// before it starts a daemon and <see cref="UblkDevice.Recover"/> makes the same ones.
/// </summary>
public static class Recoverability
{
    /// <summary>The kernel's info of device <paramref name="id"/>; throws <see cref="RecoveryRefusedException"/> if it cannot be recovered now.</summary>
    public static DevInfo Check(ControlDevice control, uint id)
    {
        ArgumentNullException.ThrowIfNull(control);
        DevInfo info;
        try
        {
            info = control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            throw new RecoveryRefusedException($"no ublk device {id} (see 'ublksharp list')");
        }
        Check(id, info);
        return info;
    }

    /// <summary>As <see cref="Check(ControlDevice, uint)"/>, for info already read.</summary>
    public static void Check(uint id, DevInfo info)
    {
        if ((info.flags & (ulong)UblkFeatures.UserRecovery) == 0)
        {
            throw new RecoveryRefusedException($"device {id} was created without recovery (add --recovery on|reissue); it cannot be recovered");
        }
        var state = (DeviceState)info.state;
        if (state == DeviceState.Live && Processes.IsAlive(info.ublksrv_pid))
        {
            throw new RecoveryRefusedException($"device {id} is live: its daemon (pid {info.ublksrv_pid}) is serving it; there is nothing to recover");
        }
        if (state == DeviceState.Dead)
        {
            throw new RecoveryRefusedException($"device {id} is dead (stopped, or never started); only a device whose daemon died can be recovered");
        }
    }
}
