using UblkSharp.Interop;

namespace UblkSharp.Runtime;

/// <summary>
/// The daemon a device record names, found only when the live process with its pid provably is
/// that daemon: same start time (and executable) as the record says. A pid alone proves nothing:
/// the daemon of a device may have died long ago and its pid been given to anyone since.
/// </summary>
public sealed class RecordedDaemon : IDisposable
{
    private RecordedDaemon(ProcessHandle process) => Process = process;

    /// <summary>A pidfd on the daemon, taken before its identity was checked, so it cannot name a later process.</summary>
    public ProcessHandle Process { get; }

    /// <summary>
    /// The daemon <paramref name="record"/> names, if process <paramref name="pid"/> is it. Null when
    /// no process has that pid, or it is provably another one (<paramref name="doubt"/> null then:
    /// the daemon is gone), or nothing proves either (<paramref name="doubt"/> says why).
    /// </summary>
    public static RecordedDaemon? Find(int pid, DeviceRecord? record, out string? doubt)
    {
        doubt = null;
        if (!Processes.IsAlive(pid))
        {
            return null;
        }
        if (record is null)
        {
            doubt = $"there is no record of the daemon in {DeviceRecord.Directory} to prove that pid {pid} is it";
            return null;
        }
        if (record.Pid != pid)
        {
            doubt = $"the device's record names pid {record.Pid}, not {pid}";
            return null;
        }
        if (record.DaemonStartTime is not long started)
        {
            doubt = "its record (written by an older ublksharp) does not say when the daemon started, so nothing proves that the process is still it";
            return null;
        }
        // The handle first, then the check: if the check passes, the handle names the daemon too.
        var process = ProcessHandle.Open(pid);
        if (process is null)
        {
            return null;
        }
        var exe = record.DaemonExecutable is null ? null : Processes.ExecutablePath(pid);
        if (Processes.StartTime(pid) != started || (exe is not null && exe != record.DaemonExecutable))
        {
            process.Dispose();
            return null; // a later process with the recycled pid: the daemon itself is gone
        }
        return new RecordedDaemon(process);
    }

    public void Dispose() => Process.Dispose();
}
