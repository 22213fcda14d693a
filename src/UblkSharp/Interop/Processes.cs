using System.Runtime.InteropServices;

namespace UblkSharp.Interop;

/// <summary>Process checks by pid, without the allocation and permission rules of System.Diagnostics.Process.</summary>
public static class Processes
{
    public const int SIGKILL = 9;
    public const int SIGTERM = 15;

    /// <summary>Whether a process with this pid exists (a zombie counts until it is reaped).</summary>
    public static bool IsAlive(int pid) => pid > 0 && (Libc.kill(pid, 0) == 0 || Marshal.GetLastPInvokeError() == Errno.EPERM);

    /// <summary>Whether this process runs as root (ublk devices need CAP_SYS_ADMIN).</summary>
    public static bool IsRoot => Libc.geteuid() == 0;

    /// <summary>Whether this user may open <paramref name="path"/> for reading and writing (access(2)).</summary>
    public static bool MayReadWrite(string path) => Libc.access(path, Libc.R_OK | Libc.W_OK) == 0;

    public static bool Signal(int pid, int signal) => pid > 0 && Libc.kill(pid, signal) == 0;

    /// <summary>Sends <paramref name="signal"/> to every process of process group <paramref name="pgid"/>; false if there is none.</summary>
    public static bool SignalGroup(int pgid, int signal) => pgid > 0 && Libc.kill(-pgid, signal) == 0;

    /// <summary>Ends this process at once (_exit): no managed shutdown, nothing more runs.</summary>
    public static void ExitNow(int code) => Libc._exit(code);

    /// <summary>
    /// When process <paramref name="pid"/> started, in clock ticks since boot (/proc/PID/stat field
    /// 22): with the pid, it names one process, since a recycled pid starts later. Null if it is gone.
    /// </summary>
    public static long? StartTime(int pid)
    {
        string stat;
        try
        {
            stat = File.ReadAllText($"/proc/{pid}/stat");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
        // The name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return fields.Length > 19 && long.TryParse(fields[19], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var ticks)
            ? ticks : null;
    }

    /// <summary>The executable of process <paramref name="pid"/> (/proc/PID/exe), or null if it is gone or hidden.</summary>
    public static string? ExecutablePath(int pid)
    {
        try
        {
            return File.ResolveLinkTarget($"/proc/{pid}/exe", returnFinalTarget: false)?.FullName;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    /// <summary>Waits until <paramref name="pid"/> is gone; false on timeout.</summary>
    public static bool WaitForExit(int pid, TimeSpan timeout)
    {
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (IsAlive(pid))
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }
            Thread.Sleep(20);
        }
        return true;
    }
}

/// <summary>Block device checks.</summary>
public static class BlockDevices
{
    /// <summary>
    /// Whether the device is mounted or held open exclusively: an O_EXCL open of a block device
    /// fails with EBUSY then.
    /// </summary>
    public static bool IsExclusivelyHeld(string path)
    {
        var fd = Libc.open(path, Libc.O_RDONLY | Libc.O_EXCL | Libc.O_CLOEXEC, 0);
        if (fd < 0)
        {
            return Marshal.GetLastPInvokeError() == Errno.EBUSY;
        }
        _ = Libc.close(fd);
        return false;
    }
}
