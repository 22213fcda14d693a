using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>Why a device cannot be recovered now, if it cannot (see <see cref="Recoverability.Obstacle"/>).</summary>
public enum RecoveryObstacle
{
    None,

    /// <summary>Created without USER_RECOVERY: the kernel stops it when its daemon dies.</summary>
    NoRecovery,

    /// <summary>LIVE under a daemon that still runs.</summary>
    Serving,

    /// <summary>DEAD: stopped, or never started.</summary>
    Stopped,
}

/// <summary>
/// Whether a device can be recovered: created with recovery, and its daemon died (neither live
/// under a running daemon nor stopped). One place for the refusals, so a command can make them
/// before it starts a daemon and <see cref="UblkDevice.Recover"/> makes the same ones, and `list`
/// tells an orphan by them (<see cref="Orphans"/>).
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
        var obstacle = Obstacle((DeviceState)info.state, (UblkFeatures)info.flags, Processes.IsAlive(info.ublksrv_pid));
        if (obstacle == RecoveryObstacle.None)
        {
            return;
        }
        throw obstacle switch
        {
            RecoveryObstacle.NoRecovery => new RecoveryRefusedException((info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0
                ? $"device {id} was added by a user (UNPRIVILEGED_DEV), and the kernel gives such devices no user recovery; it cannot be recovered"
                : $"device {id} was created without recovery (add --recovery on|reissue); it cannot be recovered"),
            RecoveryObstacle.Serving => new RecoveryRefusedException($"device {id} is live: its daemon (pid {info.ublksrv_pid}) is serving it; there is nothing to recover"),
            _ => new RecoveryRefusedException($"device {id} is dead (stopped, or never started); only a device whose daemon died can be recovered"),
        };
    }

    /// <summary>The rules themselves, on what the kernel says of the device and whether its daemon (the pid the kernel has) runs.</summary>
    public static RecoveryObstacle Obstacle(DeviceState state, UblkFeatures flags, bool daemonAlive)
    {
        if ((flags & UblkFeatures.UserRecovery) == 0)
        {
            return RecoveryObstacle.NoRecovery;
        }
        if (state == DeviceState.Live && daemonAlive)
        {
            return RecoveryObstacle.Serving;
        }
        return state == DeviceState.Dead ? RecoveryObstacle.Stopped : RecoveryObstacle.None;
    }
}
