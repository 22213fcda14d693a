using UblkSharp.Interop;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>
/// Orphans: devices whose daemon is gone and that nothing can bring back (no recovery, stopped, or
/// the recipe a recovery rebuilds the target from is lost). Only `del` helps them; `list` says so.
/// The recovery rules are <see cref="Recoverability"/>'s, not repeated here.
/// </summary>
public static class Orphans
{
    /// <summary>
    /// Why device <paramref name="id"/> is an orphan, or null if it is not: a pure function of the
    /// kernel's state and flags, whether a daemon (or a takeover) is at work on it, whether its
    /// recipe (/run/ublksharp/ID.json) exists, and whether its target's state died with its daemon
    /// (<paramref name="stateLost"/>: a cow overlay whose daemon ended without handing it over).
    /// </summary>
    public static string? Reason(uint id, DeviceState state, UblkFeatures flags, bool daemonAlive, bool recipePresent, bool stateLost = false)
    {
        if (daemonAlive)
        {
            return null;
        }
        return Recoverability.Obstacle(state, flags, daemonAlive: false) switch
        {
            RecoveryObstacle.NoRecovery => "its daemon is gone and it was created without recovery",
            RecoveryObstacle.Stopped => "it is stopped (DEAD) and no daemon serves it",
            _ when !recipePresent => $"its daemon is gone and its recipe {DeviceRecord.PathFor(id)} is lost",
            _ when stateLost => "its daemon died with its target's latest state in memory (a cow overlay's bitmap): a recovered device would lose writes its file system counts as done",
            _ => null,
        };
    }

    /// <summary><see cref="Reason(uint, DeviceState, UblkFeatures, bool, bool, bool)"/> for a device as the kernel and its record have it now.</summary>
    public static string? Reason(uint id, DevInfo info, DeviceRecord? record)
        => Reason(id, (DeviceState)info.state, (UblkFeatures)info.flags, DaemonAlive(id, info, record), record is not null, record is { CrashSafe: false, Released: false });

    /// <summary>
    /// Whether a process serves (or is taking over) device <paramref name="id"/>: the daemon the
    /// kernel names runs (and its record does not prove the pid recycled), or someone holds the
    /// takeover lock or /dev/ublkcN (a daemon before START_DEV, when the kernel has no pid yet).
    /// </summary>
    public static bool DaemonAlive(uint id, DevInfo info, DeviceRecord? record)
    {
        var pid = info.ublksrv_pid;
        if (Processes.IsAlive(pid))
        {
            if (record is null || record.Pid != pid || record.DaemonStartTime is null)
            {
                return true; // nothing can prove the pid was given to another process
            }
            using var daemon = RecordedDaemon.Find(pid, record, out var doubt);
            if (daemon is not null || doubt is not null)
            {
                return true;
            }
        }
        return TakeoverLock.IsHeld(id) || CharDeviceHeld(id);
    }

    // Some process has /dev/ublkcN open (only a daemon opens it; the kernel lets one opener at a time).
    private static bool CharDeviceHeld(uint id)
    {
        var path = $"/dev/ublkc{id}";
        foreach (var proc in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(proc), out _))
            {
                continue;
            }
            try
            {
                if (Directory.EnumerateFileSystemEntries(Path.Combine(proc, "fd")).Any(fd => new FileInfo(fd).LinkTarget == path))
                {
                    return true;
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Gone while we looked, or not ours to read.
            }
        }
        return false;
    }
}
