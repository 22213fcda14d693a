using Microsoft.Extensions.Logging;
using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>The device is open (mounted, or held by a process), so it is not deleted (said in words for the user).</summary>
public sealed class DeviceBusyException(string message) : IOException(message);

/// <summary>
/// Deleting a device from outside its daemon (`ublksharp del`, a mount that failed): refuse it if
/// busy, stop it (IO in flight drains through the daemon), wait for the daemon to exit, delete it
/// and remove its record.
/// </summary>
public static class DeviceDeletion
{
    public static TimeSpan StopTimeout { get; } = TimeSpan.FromSeconds(60);

    public static TimeSpan DaemonExitTimeout { get; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Deletes device <paramref name="id"/>. Unless <paramref name="force"/>, a busy device (see
    /// <see cref="StopUnlessBusy"/>) is refused with <see cref="DeviceBusyException"/>; with it, the
    /// device's IO fails from now on. <paramref name="logger"/> hears what the user should know.
    /// </summary>
    public static void Delete(ControlDevice control, uint id, bool force, ILogger? logger = null)
    {
        ArgumentNullException.ThrowIfNull(control);
        DevInfo info;
        try
        {
            info = control.GetDeviceInfo(id);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            throw new ArgumentException($"no ublk device {id} (see 'ublksharp list')");
        }
        // Read before the stop: an unsafe state directory refuses the delete while nothing has changed yet.
        var record = DeviceRecord.Load(id);
        StopUnlessBusy(control, id, info, force);
        WaitForDaemon(id, info.ublksrv_pid, record, DaemonExitTimeout, logger);
        // Asynchronous where the kernel has it: a forced delete must not wait for a mount to go.
        UblkDevice.DeleteDevice(control, id, StopTimeout);
        DeviceRecord.Remove(id);
    }

    // A short-lived opener (udev's blkid probe after a change) is waited out; a real holder is not.
    private static readonly TimeSpan TransientOpenerWait = TimeSpan.FromSeconds(2);

    /// <summary>
    /// The busy check and STOP_DEV, as one step (<see cref="UblkDevice.TryStop"/>): where the device
    /// has SAFE_STOP_DEV (7.0+) the kernel decides with TRY_STOP_DEV, so no opener slips in between;
    /// elsewhere a LIVE device that is mounted or held open exclusively is refused, then stopped.
    /// <paramref name="force"/> stops it whoever holds it (its IO fails from then on).
    /// </summary>
    public static void StopUnlessBusy(ControlDevice control, uint id, DevInfo info, bool force)
    {
        ArgumentNullException.ThrowIfNull(control);
        if (force)
        {
            control.StopDevice(id, StopTimeout);
            return;
        }
        if (!UblkDevice.TryStop(control, id, StopTimeout, TransientOpenerWait))
        {
            var what = (info.flags & (ulong)UblkFeatures.SafeStopDev) != 0 ? "open (mounted, or held by a process)" : "mounted or held open exclusively";
            throw new DeviceBusyException($"device {id} is busy: /dev/ublkb{id} is {what}; unmount it first (or del --force, and its IO fails)");
        }
    }

    /// <summary>
    /// After the stop, waits up to <paramref name="timeout"/> for the daemon (pid <paramref name="pid"/>,
    /// as the kernel has it) to exit. A daemon that ignores the stop cannot keep the device (its
    /// queues are already aborted), so it is killed, but only when <paramref name="record"/> proves
    /// that the process is the daemon; any other process is left alone, and <paramref name="logger"/> says so.
    /// </summary>
    public static void WaitForDaemon(uint id, int pid, DeviceRecord? record, TimeSpan timeout, ILogger? logger = null)
    {
        if (pid <= 0 || pid == Environment.ProcessId)
        {
            return;
        }
        using var daemon = RecordedDaemon.Find(pid, record, out var doubt);
        if (daemon is not null)
        {
            if (!daemon.Process.WaitForExit(timeout))
            {
                if (logger is not null)
                {
                    RuntimeLog.DaemonKilled(logger, id, pid, timeout.TotalSeconds);
                }
                daemon.Process.Signal(Processes.SIGKILL);
                daemon.Process.WaitForExit(TimeSpan.FromSeconds(10));
            }
        }
        else if (doubt is not null && !Processes.WaitForExit(pid, timeout))
        {
            if (logger is not null)
            {
                RuntimeLog.DaemonLeftAlone(logger, id, pid, timeout.TotalSeconds, doubt);
            }
        }
    }
}
