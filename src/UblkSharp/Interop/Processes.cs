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

    public static bool Signal(int pid, int signal) => pid > 0 && Libc.kill(pid, signal) == 0;

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
