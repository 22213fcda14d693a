using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;

namespace UblkSharp.Ublk;

/// <summary>
/// /dev/ublk-control with its SQE128 ring. Commands are synchronous and bounded in time: several
/// of them block in the kernel until a condition holds, and a server must never wait forever.
/// Commands to an unprivileged device (UNPRIVILEGED_DEV) carry its char device's path before their
/// payload, as the driver requires of every caller, root included; that is done here, so callers
/// never see the difference.
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

    // Which devices are unprivileged (their commands carry the /dev/ublkcN path), learnt once per device.
    private readonly Dictionary<uint, bool> _unprivileged = [];

    private ControlDevice(int fd, Ring ring)
    {
        _fd = fd;
        _ring = ring;
        _scratch = (byte*)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(ScratchSize, 64);
    }

    /// <summary>
    /// Whether a command timed out on this handle. It refuses every later command then (the kernel
    /// may still complete the lost one into its buffer): open a new one.
    /// </summary>
    public bool IsAbandoned => _abandoned;

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
            throw new UblkUnavailableException(
                $"{Path}: permission denied. Run as root, or let users add devices of their own: 'ublksharp setup-unprivileged' (as root) installs the udev rule that opens {Path} to them.", e);
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

    /// <summary>Default bound on a control command; START_DEV scans partitions, so it gets longer.</summary>
    public static TimeSpan DefaultTimeout { get; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// ADD_DEV. <paramref name="info"/> carries the request (dev_id uint.MaxValue = any); the result is
    /// what the kernel negotiated: the id, the clamped queue count, the rounded buffer size and the
    /// flags it kept (6.12 silently drops flags it does not know).
    /// </summary>
    public DevInfo AddDevice(DevInfo info)
    {
        var cmd = new CtrlCmd { dev_id = info.dev_id, queue_id = ushort.MaxValue };
        var res = Execute(UblkCommands.AddDev, cmd, AsBytes(ref info), AsBytes(ref info), DefaultTimeout);
        Check(res, "UBLK_CMD_ADD_DEV", info.dev_id);
        _unprivileged[info.dev_id] = (info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0;
        return info;
    }

    /// <summary>GET_DEV_INFO; throws <see cref="ErrnoException"/> with ENODEV for an unknown id.</summary>
    public DevInfo GetDeviceInfo(uint devId)
    {
        DevInfo info = default;
        var res = Execute(UblkCommands.GetDevInfo, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, AsBytes(ref info), DefaultTimeout);
        Check(res, "UBLK_CMD_GET_DEV_INFO", devId);
        return info;
    }

    /// <summary>
    /// SET_PARAMS. A failure clears every parameter in the kernel, so the caller must send a complete
    /// set again; never echo GET_PARAMS back (it carries the read-only DEVT member).
    /// </summary>
    public void SetParams(uint devId, UblkParams parameters)
    {
        parameters.len = (uint)sizeof(UblkParams);
        parameters.types &= ~UblkParams.TypeDevt;
        var res = Execute(UblkCommands.SetParams, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, AsBytes(ref parameters), default, DefaultTimeout);
        Check(res, "UBLK_CMD_SET_PARAMS", devId);
    }

    public UblkParams GetParams(uint devId)
    {
        UblkParams p = default;
        p.len = (uint)sizeof(UblkParams);
        var res = Execute(UblkCommands.GetParams, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, AsBytes(ref p), AsBytes(ref p), DefaultTimeout);
        Check(res, "UBLK_CMD_GET_PARAMS", devId);
        return p;
    }

    /// <summary>
    /// START_DEV: waits until every tag of every queue is fetched, then adds the disk and scans its
    /// partitions synchronously, so the queue threads must already be serving. Never call it from a queue thread.
    /// </summary>
    public void StartDevice(uint devId, int daemonPid, TimeSpan timeout)
    {
        var res = Execute(UblkCommands.StartDev, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue, data = (ulong)daemonPid }, default, default, timeout);
        Check(res, "UBLK_CMD_START_DEV", devId);
    }

    /// <summary>STOP_DEV: removes the disk after draining IO, so the queues must keep serving until it returns.</summary>
    public void StopDevice(uint devId, TimeSpan timeout)
    {
        var res = Execute(UblkCommands.StopDev, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, default, timeout);
        Check(res, "UBLK_CMD_STOP_DEV", devId);
    }

    /// <summary>
    /// TRY_STOP_DEV (SAFE_STOP_DEV, 7.0+): STOP_DEV only if nobody has /dev/ublkbN open. The check and
    /// the stop happen under the disk's open mutex, and a later open fails with ENXIO, so no opener can
    /// slip in between. Returns 0, -EBUSY (held open; nothing changed), -ENODEV (no such device, or
    /// no disk: never started or already stopped) or -EOPNOTSUPP/-EINVAL (a driver without the command).
    /// </summary>
    public int TryStopDevice(uint devId, TimeSpan timeout)
        => Execute(UblkCommands.TryStopDev, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, default, timeout);

    /// <summary>UPDATE_SIZE (6.16+): the disk's capacity becomes <paramref name="sectors"/> (512-byte) at once.</summary>
    public void UpdateSize(uint devId, ulong sectors)
    {
        var res = Execute(UblkCommands.UpdateSize, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue, data = sectors }, default, default, DefaultTimeout);
        Check(res, "UBLK_U_CMD_UPDATE_SIZE", devId);
    }

    /// <summary>
    /// QUIESCE_DEV (6.16+, a device created with QUIESCE and USER_RECOVERY): waits up to
    /// <paramref name="wait"/> (0 = forever, in the kernel) until every queue has an idle tag, then
    /// aborts the daemon's fetch commands (their CQEs carry -ENODEV). Once the daemon closes
    /// /dev/ublkcN the device is QUIESCED and a new daemon can recover it. -EBUSY: IO did not drain
    /// in time; -EOPNOTSUPP: the device lacks QUIESCE. A device that is not live is left as it is.
    /// </summary>
    public int QuiesceDevice(uint devId, TimeSpan wait)
        => Execute(UblkCommands.QuiesceDev, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue, data = (ulong)wait.TotalMilliseconds },
            default, default, wait + DefaultTimeout);

    /// <summary>DEL_DEV: waits until the daemon has closed /dev/ublkcN and its mappings.</summary>
    public void DeleteDevice(uint devId, TimeSpan timeout)
    {
        var res = Execute(UblkCommands.DelDev, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, default, timeout);
        Check(res, "UBLK_CMD_DEL_DEV", devId);
        _unprivileged.Remove(devId);
    }

    /// <summary>
    /// START_USER_RECOVERY: the device must be QUIESCED (its daemon died) and its char device closed,
    /// else -EBUSY; a device without USER_RECOVERY, or never started, gives -EINVAL.
    /// </summary>
    public int TryStartUserRecovery(uint devId)
        => Execute(UblkCommands.StartUserRecovery, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, default, DefaultTimeout);

    /// <summary>END_USER_RECOVERY: waits until every tag is fetched again, then the device is LIVE under <paramref name="daemonPid"/>.</summary>
    public void EndUserRecovery(uint devId, int daemonPid, TimeSpan timeout)
    {
        var res = Execute(UblkCommands.EndUserRecovery, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue, data = (ulong)daemonPid }, default, default, timeout);
        Check(res, "UBLK_CMD_END_USER_RECOVERY", devId);
    }

    /// <summary>DEL_DEV_ASYNC (6.9+): removes the device without waiting for its last opener to close.</summary>
    public void DeleteDeviceAsync(uint devId)
    {
        var res = Execute(UblkCommands.DelDevAsync, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, default, DefaultTimeout);
        Check(res, "UBLK_CMD_DEL_DEV_ASYNC", devId);
        _unprivileged.Remove(devId);
    }

    /// <summary>The CPUs blk-mq maps to queue <paramref name="queueId"/>.</summary>
    public int[] GetQueueAffinity(uint devId, int queueId)
    {
        Span<byte> mask = stackalloc byte[512]; // 4096 CPUs
        var res = Execute(UblkCommands.GetQueueAffinity, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue, data = (ulong)queueId }, default, mask, DefaultTimeout);
        Check(res, "UBLK_CMD_GET_QUEUE_AFFINITY", devId);
        var cpus = new List<int>();
        for (var i = 0; i < mask.Length * 8; i++)
        {
            if ((mask[i / 8] & (1 << (i % 8))) != 0)
            {
                cpus.Add(i);
            }
        }
        return [.. cpus];
    }

    private static Span<byte> AsBytes<T>(ref T value)
        where T : unmanaged => System.Runtime.InteropServices.MemoryMarshal.AsBytes(new Span<T>(System.Runtime.CompilerServices.Unsafe.AsPointer(ref value), 1));

    private static void Check(int res, string what, uint devId)
    {
        if (res < 0)
        {
            var hint = -res switch
            {
                Errno.ENODEV => $"no ublk device {devId}",
                Errno.EEXIST => $"ublk device {devId} already exists (or is already started)",
                Errno.EPERM or Errno.EACCES => Libc.geteuid() == 0
                    ? "permission denied: ublk devices need root (CAP_SYS_ADMIN)"
                    : $"permission denied: device {devId} is not yours (another user's, or root's; /dev/ublkc{devId} is not open to you)",
                Errno.EBUSY => "the device is busy",
                _ => null,
            };
            throw new ErrnoException(-res, what, hint);
        }
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
        var prefix = NeedsPath(cmdOp, cmd.dev_id) ? DevicePathPrefix(cmd.dev_id) : 0;
        var len = prefix + Math.Max(input.Length, output.Length);
        if (len > ScratchSize)
        {
            throw new ArgumentException($"Control command buffers are limited to {ScratchSize} bytes");
        }
        if (len > 0)
        {
            // The path (if any) is already at the start; the kernel reads the payload after it.
            var buffer = new Span<byte>(_scratch + prefix, len - prefix);
            buffer.Clear();
            input.CopyTo(buffer);
            cmd.addr = (ulong)_scratch;
            cmd.len = (ushort)len;
            cmd.dev_path_len = (ushort)prefix;
        }
        var res = Execute(cmdOp, cmd, timeout);
        // The driver looks the path up only for a device it still has: a missing /dev/ublkcN means
        // the device is being removed (its char device goes first), so it is gone as far as any
        // caller is concerned, as ENODEV says for every other device.
        if (prefix > 0 && res == -Errno.ENOENT)
        {
            res = -Errno.ENODEV;
        }
        if (output.Length > 0)
        {
            new ReadOnlySpan<byte>(_scratch + prefix, output.Length).CopyTo(output);
        }
        return res;
    }

    /// <summary>
    /// Whether device <paramref name="devId"/> was added by a user (UNPRIVILEGED_DEV): the kernel
    /// then wants /dev/ublkcN's path with every command, and checks the caller's access to it. A
    /// user can only ever command such devices; root learns it once per device from GET_DEV_INFO,
    /// which an unprivileged device answers -EINVAL when the path is missing.
    /// </summary>
    public bool IsUnprivilegedDevice(uint devId)
    {
        if (_unprivileged.TryGetValue(devId, out var known))
        {
            return known;
        }
        bool unprivileged;
        if (Libc.geteuid() != 0)
        {
            unprivileged = true;
        }
        else
        {
            _unprivileged[devId] = false; // the probe itself goes without the path
            DevInfo info = default;
            var res = Execute(UblkCommands.GetDevInfo, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, AsBytes(ref info), DefaultTimeout);
            if (res == -Errno.ENODEV)
            {
                _unprivileged.Remove(devId);
                return false;
            }
            unprivileged = res == -Errno.EINVAL || (res == 0 && (info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0);
        }
        _unprivileged[devId] = unprivileged;
        return unprivileged;
    }

    // ADD_DEV and GET_FEATURES name no existing device; GET_DEV_INFO2 wants the path from everyone.
    private bool NeedsPath(uint cmdOp, uint devId)
    {
        var nr = cmdOp & 0xff;
        return nr is not (0x04 or 0x13) && devId != uint.MaxValue && (nr == 0x12 || IsUnprivilegedDevice(devId));
    }

    // Writes "/dev/ublkcN\0" at the start of the scratch buffer; returns its length (the NUL included).
    private int DevicePathPrefix(uint devId)
    {
        var path = $"/dev/ublkc{devId}\0";
        var n = System.Text.Encoding.ASCII.GetBytes(path, new Span<byte>(_scratch, ScratchSize));
        return n;
    }

    /// <summary>
    /// GET_DEV_INFO2 (6.3+): like GET_DEV_INFO, but for any caller with read access to
    /// /dev/ublkcN, privileged device or not: what the udev helper uses to learn a device's owner.
    /// </summary>
    public DevInfo GetDeviceInfo2(uint devId)
    {
        DevInfo info = default;
        var res = Execute(UblkCommands.GetDevInfo2, new CtrlCmd { dev_id = devId, queue_id = ushort.MaxValue }, default, AsBytes(ref info), DefaultTimeout);
        Check(res, "UBLK_CMD_GET_DEV_INFO2", devId);
        return info;
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
