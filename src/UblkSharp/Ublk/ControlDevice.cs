using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Ublk;

/// <summary>
/// /dev/ublk-control with its SQE128 ring. Commands are synchronous and bounded in time: several
/// of them block in the kernel until a condition holds, and a server must never wait forever.
/// </summary>
public sealed unsafe class ControlDevice : IDisposable
{
    public const string Path = "/dev/ublk-control";

    // Command buffers live in native memory owned here, not on a caller's stack: a command that
    // times out may still be written by the kernel later, so its buffer is then never freed.
    private const int ScratchSize = 4096;

    private readonly int _fd;
    private readonly Ring _ring;
    private byte* _scratch;
    private bool _abandoned;
    private ulong _nextUserData;

    private ControlDevice(int fd, Ring ring)
    {
        _fd = fd;
        _ring = ring;
        _scratch = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(ScratchSize, 64);
    }

    /// <summary>Opens the control device, with a message that says what to do when it is missing.</summary>
    public static ControlDevice Open()
    {
        int fd;
        try
        {
            fd = Libc.OpenOrThrow(Path, Libc.O_RDWR);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENOENT)
        {
            throw new UblkUnavailableException(
                $"{Path} does not exist: this kernel has no ublk driver loaded. Try 'modprobe ublk_drv' (Linux 6.0+ with CONFIG_BLK_DEV_UBLK), " +
                "or use tools/ublksharp-vm to run under a kernel that has it.", e);
        }
        catch (ErrnoException e) when (e.Errno is Errno.EACCES or Errno.EPERM)
        {
            throw new UblkUnavailableException($"{Path}: permission denied. Run as root (or with CAP_SYS_ADMIN).", e);
        }
        try
        {
            return new ControlDevice(fd, Ring.Create(RingOptions.Control));
        }
        catch
        {
            _ = Libc.close(fd);
            throw;
        }
    }

    /// <summary>UBLK_U_CMD_GET_FEATURES (6.5+): what the running driver supports.</summary>
    public UblkFeatures GetFeatures(TimeSpan? timeout = null)
    {
        ulong features = 0;
        var cmd = new CtrlCmd { dev_id = uint.MaxValue, queue_id = ushort.MaxValue };
        var res = Execute(UblkCommands.GetFeatures, cmd, default, new Span<byte>(&features, sizeof(ulong)), timeout ?? TimeSpan.FromSeconds(10));
        if (res < 0)
        {
            throw new ErrnoException(-res, "UBLK_U_CMD_GET_FEATURES",
                res == -Errno.EOPNOTSUPP ? "The driver predates GET_FEATURES (Linux 6.5)" : null);
        }
        return (UblkFeatures)features;
    }

    /// <summary>
    /// Sends one control command and waits for its completion. <paramref name="input"/> is copied
    /// into the command's buffer (cmd.addr/len), and <paramref name="output"/> receives it back after
    /// completion; the buffer is as long as the larger of the two. Returns the CQE result (a negative
    /// errno on failure). Throws <see cref="TimeoutException"/> if the kernel does not answer in time.
    /// </summary>
    public int Execute(uint cmdOp, CtrlCmd cmd, ReadOnlySpan<byte> input, Span<byte> output, TimeSpan timeout)
    {
        ObjectDisposedException.ThrowIf(_scratch == null, this);
        if (_abandoned)
        {
            throw new InvalidOperationException("An earlier control command never completed; open a new ControlDevice");
        }
        var len = Math.Max(input.Length, output.Length);
        if (len > ScratchSize)
        {
            throw new ArgumentException($"Control command buffers are limited to {ScratchSize} bytes");
        }
        if (len > 0)
        {
            var buffer = new Span<byte>(_scratch, len);
            buffer.Clear();
            input.CopyTo(buffer);
            cmd.addr = (ulong)_scratch;
            cmd.len = (ushort)len;
        }
        var res = Execute(cmdOp, cmd, timeout);
        if (output.Length > 0)
        {
            new ReadOnlySpan<byte>(_scratch, output.Length).CopyTo(output);
        }
        return res;
    }

    private int Execute(uint cmdOp, in CtrlCmd cmd, TimeSpan timeout)
    {
        var userData = ++_nextUserData;
        _ring.PrepareUringCmd(_fd, cmdOp, cmd, userData);
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        _ring.Submit();
        while (true)
        {
            while (_ring.TryGetCompletion(out var cqe))
            {
                if (cqe.user_data == userData)
                {
                    return cqe.res;
                }
            }
            var left = deadline - Environment.TickCount64;
            if (left <= 0)
            {
                _abandoned = true;
                throw new TimeoutException($"ublk control command 0x{cmdOp:x8} did not complete within {timeout.TotalSeconds:0.#} s");
            }
            _ring.SubmitAndWait(1, TimeSpan.FromMilliseconds(left));
        }
    }

    public void Dispose()
    {
        if (_scratch == null)
        {
            return;
        }
        _ring.Dispose();
        _ = Libc.close(_fd);
        if (!_abandoned)
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree(_scratch);
        }
        _scratch = null;
    }
}

/// <summary>The ublk driver cannot be used here (missing, or no permission).</summary>
public sealed class UblkUnavailableException(string message, Exception? inner = null) : Exception(message, inner);
