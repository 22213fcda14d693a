using System.Runtime.InteropServices;

namespace UblkSharp.Interop;

/// <summary>
/// A pidfd: it names one process for as long as it is open, so a signal sent through it can never
/// reach another process that was given the same pid later (kill(pid) can).
/// </summary>
public sealed unsafe class ProcessHandle : IDisposable
{
    private int _fd;

    private ProcessHandle(int pid, int fd)
    {
        Pid = pid;
        _fd = fd;
    }

    public int Pid { get; }

    /// <summary>A handle on the process <paramref name="pid"/> names now; null if there is none.</summary>
    public static ProcessHandle? Open(int pid)
    {
        if (pid <= 0)
        {
            return null;
        }
        var fd = (int)Libc.syscall(Libc.SYS_pidfd_open, pid, 0, 0, 0, 0, 0);
        if (fd < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            return errno == Errno.ESRCH ? null : throw new ErrnoException(errno, $"pidfd_open {pid}");
        }
        return new ProcessHandle(pid, fd);
    }

    /// <summary>Sends <paramref name="signal"/> to this process; false if it has exited.</summary>
    public bool Signal(int signal)
    {
        ObjectDisposedException.ThrowIf(_fd < 0, this);
        return Libc.syscall(Libc.SYS_pidfd_send_signal, _fd, signal, 0, 0, 0, 0) == 0;
    }

    /// <summary>Whether the process has exited (a zombie has).</summary>
    public bool HasExited => WaitForExit(TimeSpan.Zero);

    /// <summary>Waits until the process exits; false on timeout. The pidfd polls readable once it has.</summary>
    public bool WaitForExit(TimeSpan timeout)
    {
        ObjectDisposedException.ThrowIf(_fd < 0, this);
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (true)
        {
            var pfd = new Libc.PollFd { fd = _fd, events = Libc.POLLIN };
            var left = Math.Max(0, deadline - Environment.TickCount64);
            var n = Libc.poll(&pfd, 1, (int)Math.Min(left, int.MaxValue));
            if (n > 0)
            {
                return true;
            }
            if (n < 0 && Marshal.GetLastPInvokeError() is var errno && errno != Errno.EINTR)
            {
                throw new ErrnoException(errno, $"poll on the pidfd of {Pid}");
            }
            if (n == 0 && Environment.TickCount64 >= deadline)
            {
                return false;
            }
        }
    }

    public void Dispose()
    {
        if (_fd >= 0)
        {
            _ = Libc.close(_fd);
            _fd = -1;
        }
    }
}
