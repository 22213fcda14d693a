using System.Runtime.InteropServices;
using UblkSharp.Interop;

namespace UblkSharp.VmTests;

/// <summary>
/// What udev and blkid do to every new block device, in a loop on its own thread: open each
/// /dev/ublkb* that exists read-only, read its first 64 KiB (O_DIRECT and buffered by turns),
/// close. An open that fails because the device is gone (ENOENT, ENXIO, ENODEV) is fine; an open
/// that succeeds followed by a read that fails or comes back short is a "half-torn" device, which
/// autoclear must never show.
/// </summary>
internal sealed unsafe class AutoclearReader : IDisposable
{
    private const int Length = 64 << 10;
    private readonly Thread _thread;
    private readonly List<string> _halfTorn = [];
    private readonly Dictionary<int, long> _openErrors = [];
    private volatile bool _stop;
    private long _reads;
    private long _passes;

    public AutoclearReader()
    {
        _thread = new Thread(Loop) { IsBackground = true, Name = "udev-like-reader" };
        _thread.Start();
    }

    /// <summary>Successful open-read-close rounds.</summary>
    public long Reads => Interlocked.Read(ref _reads);

    /// <summary>Scans of /dev.</summary>
    public long Passes => Interlocked.Read(ref _passes);

    public string[] HalfTorn
    {
        get
        {
            lock (_halfTorn)
            {
                return [.. _halfTorn];
            }
        }
    }

    /// <summary>Failed opens by errno.</summary>
    public Dictionary<int, long> OpenErrors
    {
        get
        {
            lock (_halfTorn)
            {
                return new Dictionary<int, long>(_openErrors);
            }
        }
    }

    public string Summary
    {
        get
        {
            var errors = OpenErrors;
            return $"{Reads} reads in {Passes} passes, {HalfTorn.Length} half-torn, failed opens: " +
                (errors.Count == 0 ? "none" : string.Join(", ", errors.OrderBy(kv => kv.Key).Select(kv => $"errno {kv.Key} x{kv.Value}")));
        }
    }

    private void Loop()
    {
        var buffer = (byte*)NativeMemory.AlignedAlloc(Length, 4096);
        try
        {
            var direct = false;
            while (!_stop)
            {
                string[] nodes;
                try
                {
                    nodes = Directory.GetFiles("/dev", "ublkb*");
                }
                catch (IOException)
                {
                    continue;
                }
                foreach (var node in nodes)
                {
                    direct = !direct;
                    ReadOnce(node, direct, buffer);
                }
                Interlocked.Increment(ref _passes);
                Thread.Sleep(2);
            }
        }
        finally
        {
            NativeMemory.AlignedFree(buffer);
        }
    }

    private void ReadOnce(string node, bool direct, byte* buffer)
    {
        int fd;
        do
        {
            fd = Libc.open(node, Libc.O_RDONLY | Libc.O_CLOEXEC | (direct ? Libc.O_DIRECT : 0), 0);
        }
        while (fd < 0 && Marshal.GetLastPInvokeError() == Errno.EINTR);
        if (fd < 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            lock (_halfTorn)
            {
                _openErrors[errno] = _openErrors.GetValueOrDefault(errno) + 1;
            }
            return;
        }
        try
        {
            long done = 0;
            while (done < Length)
            {
                var n = Libc.read(fd, buffer + done, (nuint)(Length - done));
                if (n < 0 && Marshal.GetLastPInvokeError() == Errno.EINTR)
                {
                    continue;
                }
                if (n <= 0)
                {
                    var what = n < 0 ? $"errno {Marshal.GetLastPInvokeError()}" : "end of device";
                    lock (_halfTorn)
                    {
                        _halfTorn.Add($"{DateTime.UtcNow:HH:mm:ss.fff} {node} ({(direct ? "O_DIRECT" : "buffered")}): opened, then read at {done}: {what}");
                    }
                    return;
                }
                done += n;
            }
            Interlocked.Increment(ref _reads);
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }

    /// <summary>Stops the reader; false if a read of it did not come back within <paramref name="timeout"/>.</summary>
    public bool Stop(TimeSpan timeout)
    {
        _stop = true;
        return _thread.Join(timeout);
    }

    public void Dispose() => Stop(TimeSpan.FromSeconds(30));
}
