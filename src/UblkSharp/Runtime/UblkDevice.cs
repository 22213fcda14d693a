using Microsoft.Extensions.Logging;
using UblkSharp.Interop;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime;

/// <summary>A device cannot be recovered in its current state (said in words for the user).</summary>
public sealed class RecoveryRefusedException(string message) : Exception(message);

/// <summary>
/// A live ublk device serving a <see cref="BlockTarget"/>: ADD_DEV, SET_PARAMS, one thread per
/// queue, then START_DEV from this (the control) thread once every queue is fetching, because
/// START_DEV reads the partition table through the queues. A failure at any step removes the
/// device again, so a failed create leaves nothing behind.
/// </summary>
public sealed class UblkDevice : IDisposable
{
    private ControlDevice _control;
    private readonly BlockTarget _target;
    private readonly DeviceOptions _options;
    private readonly ILogger _logger;
    private readonly UblkQueue[] _queues;
    private int _charFd;
    private bool _deleted;

    private UblkDevice(ControlDevice control, BlockTarget target, DeviceOptions options, DevInfo info)
    {
        _control = control;
        _target = target;
        _options = options;
        _logger = options.LoggerFactory.CreateLogger<UblkDevice>();
        Info = info;
        _queues = new UblkQueue[info.nr_hw_queues];
        _charFd = -1;
    }

    // A control command that timed out leaves its handle unusable (the kernel may still write the
    // command's buffer): later commands, the clean-up above all, go through a fresh one.
    private ControlDevice Control
    {
        get
        {
            if (_control.IsAbandoned)
            {
                var fresh = ControlDevice.Open();
                _control.Dispose();
                _control = fresh;
            }
            return _control;
        }
    }

    /// <summary>What the kernel negotiated at ADD_DEV (id, queues, flags).</summary>
    public DevInfo Info { get; }

    public uint Id => Info.dev_id;

    public string BlockPath => $"/dev/ublkb{Id}";

    public string CharPath => $"/dev/ublkc{Id}";

    public BlockTarget Target => _target;

    /// <summary>Each queue's requests, bytes, errors and latencies now (read while the queues run).</summary>
    public Metrics.DeviceStats Stats() =>
        new(Id, DateTimeOffset.UtcNow.ToUnixTimeMilliseconds(), [.. _queues.Where(q => q is not null).Select(q => q.Stats.Snapshot(q.QueueId, q.BusyTags))]);

    /// <summary>Requests committed with an error, over all queues.</summary>
    public long Errors => _queues.Where(q => q is not null).Sum(q => q.Errors);

    /// <summary>Backend steps retried (short or EAGAIN), over all queues.</summary>
    public long Retries => _queues.Where(q => q is not null).Sum(q => q.Retries);

    /// <summary>Exceptions thrown by the target on queue threads (each failed one request with EIO, or, from a backend's Reap, none).</summary>
    public long TargetExceptions => _queues.Where(q => q is not null).Sum(q => q.TargetExceptions);

    /// <summary>Second commits refused and stray backend completions ignored, over all queues: 0 unless something is wrong.</summary>
    public long ExactlyOnceViolations => _queues.Where(q => q is not null).Sum(q => q.ExactlyOnceViolations);

    /// <summary>Bytes allocated on queue threads in steady state (see <see cref="UblkQueue.SteadyStateAllocatedBytes"/>); 0 when the hot path is allocation-free.</summary>
    public long SteadyStateAllocatedBytes => _queues.Where(q => q is not null).Sum(q => q.SteadyStateAllocatedBytes);

    /// <summary>The queues, for tests that read each one's counters.</summary>
    internal IReadOnlyList<UblkQueue> Queues => _queues;

    /// <summary>Requests completed, over all queues.</summary>
    public long Completed => _queues.Where(q => q is not null).Sum(q => q.Completed);

    /// <summary>
    /// What a queue thread does when it fails while serving, unless the caller says otherwise: logs
    /// it to <paramref name="logger"/> and ends the process at once, since a queue that stops serving
    /// would hang the device's IO forever, while the kernel fails (or, with recovery, holds) the IO
    /// of a dead daemon.
    /// </summary>
    public static Action<Exception> ExitOnFailure(ILogger logger)
    {
        ArgumentNullException.ThrowIfNull(logger);
        return e =>
        {
            RuntimeLog.QueueThreadFailed(logger, e);
            Libc._exit(70);
        };
    }

    /// <summary>Why a user (not root) cannot have a recoverable device.</summary>
    public const string UnprivilegedRecoveryRefused =
        "--recovery (and --supervise, upgrade) need a device added by root: the kernel gives devices that users add (UNPRIVILEGED_DEV) no user recovery, so a crashed daemon's device could never be taken over";

    /// <summary>Creates, sets up and starts a device. On return <see cref="BlockPath"/> exists and serves IO.</summary>
    public static UblkDevice Create(BlockTarget target, DeviceOptions options, Action<Exception>? onFatal = null)
    {
        ArgumentNullException.ThrowIfNull(target);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        ValidateTarget(target);
        if (options.Recovery != RecoveryMode.Off && !target.SurvivesHandOver)
        {
            throw new ArgumentException($"--recovery is refused: {target.RecoveryRefusal}");
        }
        // A user (not root) can only add devices the kernel marks as theirs; root's request for it is
        // ignored by the kernel, so it is never asked.
        var unprivileged = !Processes.IsRoot;
        if (unprivileged && options.Recovery != RecoveryMode.Off)
        {
            throw new ArgumentException(UnprivilegedRecoveryRefused);
        }
        var control = ControlDevice.Open();
        UblkDevice? device = null;
        try
        {
            var wanted = options.Flags | options.Recovery.Flags() | (options.NoPartitionScan ? UblkFeatures.NoAutoPartScan : 0)
                | (unprivileged ? UblkFeatures.UnprivilegedDev : 0);
            var dataPath = ZeroCopyFlags(control, target, options.ZeroCopy, unprivileged);
            if (options.ZeroCopy is ZeroCopyMode.On or ZeroCopyMode.Explicit)
            {
                wanted |= dataPath & (UblkFeatures.AutoBufReg | UblkFeatures.SupportZeroCopy); // so that a driver dropping it is caught below
            }
            if (options.Batch == BatchMode.On)
            {
                if (BatchRefusal(options) is { } why)
                {
                    throw new NotSupportedException($"--batch on: {why}");
                }
                wanted |= UblkFeatures.BatchIo; // refused below, with the kernel it needs, where not offered
            }
            // Auto keeps a command per request for a recoverable device: a batched one cannot be
            // quiesced for a hand-over (see HandOverRefusal), so it could be upgraded only with
            // --recovery reissue, and only by its daemon exiting.
            else if (options.Batch == BatchMode.Auto && options.Recovery == RecoveryMode.Off && BatchRefusal(options) is null
                && (Offered(control) & UblkFeatures.BatchIo) != 0)
            {
                dataPath |= UblkFeatures.BatchIo;
            }
            RequireFeatures(control, wanted);
            var optional = dataPath | (WantsUserCopy(control, target, wanted) ? UblkFeatures.UserCopy : 0);
            // A recoverable device can also be quiesced for a hand-over where the driver can (6.16+).
            if (options.Recovery != RecoveryMode.Off && (Offered(control) & UblkFeatures.Quiesce) != 0)
            {
                optional |= UblkFeatures.Quiesce;
            }
            var request = new DevInfo
            {
                nr_hw_queues = (ushort)options.Queues,
                queue_depth = (ushort)options.Depth,
                max_io_buf_bytes = (uint)options.MaxIoBytes,
                dev_id = options.DeviceId < 0 ? uint.MaxValue : (uint)options.DeviceId,
                flags = (ulong)(wanted | optional | UblkFeatures.CmdIoctlEncode),
            };
            var info = control.AddDevice(request);
            device = new UblkDevice(control, target, options, info);
            // The driver drops flags it does not know without a word: check what it kept.
            var dropped = wanted & ~(UblkFeatures)info.flags;
            if (dropped != 0)
            {
                throw new NotSupportedException($"this kernel's ublk driver dropped {UblkFeatureNames.Format(dropped)} at ADD_DEV");
            }
            device.SetUp(onFatal, recovering: false);
            Metrics.UblkMeter.Add(device, device.Stats);
            return device;
        }
        catch
        {
            if (device is not null)
            {
                device.Abort();
            }
            else
            {
                control.Dispose();
            }
            throw;
        }
    }

    /// <summary>
    /// Takes over a device whose daemon died (state QUIESCED, created with recovery on): START_USER_RECOVERY,
    /// new queues fetching every tag, then END_USER_RECOVERY with this process as the daemon. The target
    /// must be rebuilt as it was (the kernel keeps the parameters; SET_PARAMS is refused now).
    /// The device's <see cref="TakeoverLock"/> is held from before START_USER_RECOVERY until
    /// END_USER_RECOVERY succeeded or the attempt failed: taken here, unless the caller already
    /// holds it (<paramref name="takeover"/>, e.g. an upgrade that took it before quiescing the old
    /// daemon). Another takeover under way fails this one with <see cref="TakeoverInProgressException"/>
    /// before anything is changed. A target that does not survive a crash (<see cref="BlockTarget.SurvivesRestart"/>
    /// false: a cow overlay) is taken over only from a daemon that handed the device over
    /// (<paramref name="handedOver"/>, its record's <see cref="DeviceRecord.Released"/>); after a
    /// crash it is refused, since the device would lose writes its file system counts as done.
    /// </summary>
    public static UblkDevice Recover(uint id, BlockTarget target, DeviceOptions options, Action<Exception>? onFatal = null, TakeoverLock? takeover = null, bool handedOver = false)
    {
        ArgumentNullException.ThrowIfNull(target);
        ArgumentNullException.ThrowIfNull(options);
        if (takeover is not null && takeover.Id != id)
        {
            throw new ArgumentException($"the takeover lock given is device {takeover.Id}'s, not device {id}'s", nameof(takeover));
        }
        if (!target.SurvivesRestart && !(handedOver && target.SurvivesHandOver))
        {
            throw new RecoveryRefusedException(CrashLostStateMessage(id, target.Kind));
        }
        var control = ControlDevice.Open();
        TakeoverLock? ownLock = null;
        try
        {
            Recoverability.Check(control, id);
            ownLock = takeover is null ? TakeoverLock.Take(id, "recover") : null;
            // Read again under the lock: a takeover that finished meanwhile left the device live.
            var info = Recoverability.Check(control, id);
            // The device may have been resized since its target's recipe was written: the kernel's size rules.
            var kernelSize = (long)control.GetParams(id).basic.dev_sectors << 9;
            if (kernelSize != target.Size)
            {
                if (!target.CanResize)
                {
                    throw new RecoveryRefusedException($"device {id} is {kernelSize} bytes but the {target.Kind} target is {target.Size} bytes");
                }
                target.Resize(kernelSize, growBacking: false);
            }
            var deadline = Environment.TickCount64 + (long)options.StartTimeout.TotalMilliseconds;
            while (true)
            {
                var now = control.GetDeviceInfo(id);
                Recoverability.Check(id, now);
                var state = (DeviceState)now.state;
                var res = state == DeviceState.Live ? -Errno.EBUSY : control.TryStartUserRecovery(id);
                if (res == 0)
                {
                    break;
                }
                // EBUSY: the dying daemon still holds /dev/ublkcN, or the kernel has not quiesced yet.
                if (res != -Errno.EBUSY || Environment.TickCount64 > deadline)
                {
                    throw new ErrnoException(-res, "UBLK_CMD_START_USER_RECOVERY", $"device {id} is {state}");
                }
                Thread.Sleep(20);
            }
            info = control.GetDeviceInfo(id);
            var device = new UblkDevice(control, target, options, info);
            try
            {
                device.SetUp(onFatal, recovering: true);
                Metrics.UblkMeter.Add(device, device.Stats);
            }
            catch
            {
                // Leave the device quiesced for another attempt; only this process's resources go.
                device.ReleaseLocal();
                device._control.Dispose(); // a fresh handle, if a timeout replaced the first
                throw;
            }
            return device;
        }
        catch
        {
            control.Dispose();
            throw;
        }
        finally
        {
            ownLock?.Dispose();
        }
    }

    /// <summary>Why a device whose target's state died with its daemon is not recovered.</summary>
    public static string CrashLostStateMessage(uint id, string kind) =>
        $"device {id}: its daemon ended without handing it over, and the {kind} target keeps its latest state in the daemon's memory (a cow overlay's bitmap bits since the last write-back): a recovered device would lose writes its file system counts as done, so it is not recovered; 'ublksharp del -n {id}' removes it";

    // GET_FEATURES; nothing on a driver older than 6.5.
    private static UblkFeatures Offered(ControlDevice control)
    {
        try
        {
            return control.GetFeatures();
        }
        catch (ErrnoException)
        {
            return UblkFeatures.None;
        }
    }

    /// <summary>Whether the driver has UPDATE_SIZE (Linux 6.16+), so <see cref="Resize"/> can work.</summary>
    public bool CanUpdateSize => (Offered(_control) & UblkFeatures.UpdateSize) != 0;

    /// <summary>The capacity the kernel has for this device now (it changes with <see cref="Resize"/>).</summary>
    public long KernelSize => (long)_control.GetParams(Id).basic.dev_sectors << 9;

    /// <summary>
    /// UPDATE_SIZE (Linux 6.16+): the device takes <paramref name="newSize"/> bytes while it serves.
    /// The target grows before the kernel does and shrinks after it, so every request the kernel
    /// sends is in range. A shrink needs <paramref name="allowShrink"/>: data past the new end is no
    /// longer reachable. Call it from the thread that created the device (the control ring's).
    /// </summary>
    public void Resize(long newSize, bool allowShrink, bool growBacking)
    {
        ObjectDisposedException.ThrowIf(_deleted, this);
        if ((Offered(_control) & UblkFeatures.UpdateSize) == 0)
        {
            throw new NotSupportedException(NoUpdateSizeMessage);
        }
        var lbs = _target.LogicalBlockSize;
        if (newSize <= 0 || newSize % lbs != 0)
        {
            throw new ArgumentException($"The device size must be a positive multiple of {lbs} bytes, not {newSize}");
        }
        if (!_target.CanResize)
        {
            throw new NotSupportedException($"the {_target.Kind} target cannot change its size");
        }
        var old = KernelSize;
        if (newSize < old && !allowShrink)
        {
            throw new ArgumentException($"device {Id} is {old} bytes; shrinking it to {newSize} cuts off what lies past the new end: pass --shrink to do it anyway");
        }
        if (newSize >= old)
        {
            _target.Resize(newSize, growBacking);
            _control.UpdateSize(Id, (ulong)newSize >> 9);
        }
        else
        {
            _control.UpdateSize(Id, (ulong)newSize >> 9);
            _target.Resize(newSize, growBacking);
        }
    }

    /// <summary>What a kernel without UPDATE_SIZE is told.</summary>
    public static string NoUpdateSizeMessage =>
        $"this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer UPDATE_SIZE (Linux 6.16+): a device keeps the size it was created with; " +
        "delete it and add it again with the new size";

    /// <summary>
    /// QUIESCE_DEV (Linux 6.16+; a device created with recovery): the kernel waits up to
    /// <paramref name="wait"/> for each queue to have an idle tag, holds new IO (or fails it, with
    /// recovery fail-io) and aborts the fetches parked at that instant; the queues answer the
    /// requests they still hold, end, and this process lets go of the device without stopping it.
    /// The device is then QUIESCED (FAIL_IO with fail-io), ready for <see cref="Recover"/> by this or another process. False if IO did not drain in time
    /// (nothing changed).
    /// </summary>
    public bool Quiesce(TimeSpan wait)
    {
        ObjectDisposedException.ThrowIf(_deleted, this);
        if (((UblkFeatures)Info.flags & UblkFeatures.Quiesce) == 0)
        {
            throw new NotSupportedException((Offered(_control) & UblkFeatures.Quiesce) == 0
                ? $"this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer QUIESCE (Linux 6.16+)"
                : $"device {Id} was created without recovery (--recovery on|reissue|fail-io), so it cannot be quiesced");
        }
        if (((UblkFeatures)Info.flags & UblkFeatures.BatchIo) != 0)
        {
            // ublk_batch_cancel_queue() sets force_abort, which ublk_prep_req() checks first.
            throw new NotSupportedException($"device {Id} uses batched IO: Linux 7.3's QUIESCE_DEV would fail its requests with EIO until the next daemon attaches; " +
                "a batched device with recovery reissue is handed over by its daemon exiting (HandOver)");
        }
        var res = _control.QuiesceDevice(Id, wait);
        if (res == -Errno.EBUSY)
        {
            return false;
        }
        if (res < 0)
        {
            throw new ErrnoException(-res, "UBLK_U_CMD_QUIESCE_DEV", $"device {Id}");
        }
        // A queue whose every tag the daemon held at that instant gets no ABORT (ublk_cancel_cmd
        // skips such tags): told here, it ends once its requests are answered.
        foreach (var q in _queues)
        {
            q?.RequestEnd();
        }
        LetGo(WaitForStop(_options.StopTimeout), "QUIESCE_DEV");
        return true;
    }

    /// <summary>
    /// Why a device with these flags (its <see cref="DevInfo.flags"/>) cannot be handed to another
    /// daemon with no failed IO, or null if it can. With QUIESCE_DEV (6.16+) any recovery mode but
    /// fail-io can; without it (6.12) only reissue: the requests that arrive while the old daemon
    /// lets go are requeued for the new one only with USER_RECOVERY_REISSUE, and fail without it.
    /// </summary>
    public static string? HandOverRefusal(uint id, ulong flags)
    {
        var f = (UblkFeatures)flags;
        if ((f & UblkFeatures.UserRecovery) == 0)
        {
            return $"device {id} was created without recovery (add --recovery on|reissue): the kernel would fail its IO while no daemon serves it";
        }
        if ((f & UblkFeatures.UserRecoveryFailIo) != 0)
        {
            return $"device {id} has recovery fail-io: its IO would fail while no daemon serves it";
        }
        if ((f & UblkFeatures.BatchIo) != 0 && (f & UblkFeatures.UserRecoveryReissue) == 0)
        {
            // QUIESCE_DEV runs ublk_batch_cancel_queue(), which sets force_abort: ublk_prep_req()
            // then fails every request with EIO until the next daemon attaches. A batched device is
            // handed over by its daemon exiting instead, which requeues only under reissue.
            return $"device {id} uses batched IO (add --batch on) with recovery on: Linux 7.3's QUIESCE_DEV would fail its requests, and without it only a device created with --recovery reissue keeps the requests of a hand-over";
        }
        if ((f & UblkFeatures.Quiesce) == 0 && (f & UblkFeatures.UserRecoveryReissue) == 0)
        {
            return $"device {id} has recovery on, and this kernel has no QUIESCE_DEV (Linux 6.16+): the requests that arrive during the hand-over would fail; only a device created with --recovery reissue can be upgraded here";
        }
        return null;
    }

    /// <summary>
    /// Lets another daemon take this device over with no failed IO: every request is either answered
    /// here or left held in the kernel for the next daemon's <see cref="Recover"/>. With QUIESCE_DEV
    /// (and IO not batched) this is <see cref="Quiesce"/>, and the device is QUIESCED on return.
    /// Without it (6.12, or a batched device; recovery reissue) the queues stop serving new requests and answer the ones in service; the process
    /// must then exit (soon: new IO waits), which requeues the rest and quiesces the device. Throws if
    /// <see cref="HandOverRefusal"/> refuses, or if IO did not drain within <paramref name="wait"/>
    /// (with QUIESCE_DEV): <see cref="RecoveryRefusedException"/> when nothing changed and this process
    /// still serves the device, anything else when it no longer does.
    /// </summary>
    public void HandOver(TimeSpan wait)
    {
        ObjectDisposedException.ThrowIf(_deleted, this);
        if (HandOverRefusal(Id, Info.flags) is string refusal)
        {
            throw new RecoveryRefusedException(refusal);
        }
        if (((UblkFeatures)Info.flags & (UblkFeatures.Quiesce | UblkFeatures.BatchIo)) == UblkFeatures.Quiesce)
        {
            if (!Quiesce(wait))
            {
                throw new RecoveryRefusedException($"device {Id}: IO did not drain within {wait.TotalSeconds:0.#} s for QUIESCE_DEV; the device was not handed over");
            }
            return;
        }
        // From here on the device is the next daemon's: a later Dispose must not stop it.
        _deleted = true;
        foreach (var q in _queues)
        {
            q?.RequestHandOver();
        }
        var deadline = DateTime.UtcNow + _options.StopTimeout;
        foreach (var q in _queues)
        {
            if (q is not null && !q.WaitParked(Max(deadline - DateTime.UtcNow, TimeSpan.Zero)))
            {
                throw new TimeoutException($"ublk device {Id}: queue {q.QueueId} did not answer its requests within {_options.StopTimeout.TotalSeconds} s of the hand-over");
            }
        }
        LeftForNextDaemon = _queues.Where(q => q is not null).Sum(q => q.LeftForNextDaemon);
    }

    // After QUIESCE_DEV or a hand-over the device is the next daemon's, whatever happens here: the
    // queues are made to end (closing a ring requeues what it still held), and a later Dispose
    // must not stop the device.
    private void LetGo(bool ended, string after)
    {
        _deleted = true;
        ReleaseLocal();
        try
        {
            if (!ended)
            {
                throw new TimeoutException($"ublk device {Id}: queues did not end within {_options.StopTimeout.TotalSeconds} s of {after}");
            }
            WaitUntilNotLive(after);
        }
        finally
        {
            _control.Dispose();
        }
    }

    /// <summary>Requests that arrived during <see cref="HandOver"/> and were left to the next daemon.</summary>
    public long LeftForNextDaemon { get; private set; }

    // The state turns when the kernel drops the last reference to /dev/ublkcN, which a closing
    // io_uring gives up a little later (its teardown is asynchronous).
    private void WaitUntilNotLive(string after)
    {
        var deadline = Environment.TickCount64 + (long)_options.StopTimeout.TotalMilliseconds;
        while ((DeviceState)_control.GetDeviceInfo(Id).state == DeviceState.Live)
        {
            if (Environment.TickCount64 > deadline)
            {
                throw new TimeoutException($"ublk device {Id} is still live {_options.StopTimeout.TotalSeconds} s after {after}");
            }
            Thread.Sleep(2);
        }
    }

    private static void RequireFeatures(ControlDevice control, UblkFeatures wanted)
    {
        if (wanted == 0)
        {
            return;
        }
        UblkFeatures offered;
        try
        {
            offered = control.GetFeatures();
        }
        catch (ErrnoException)
        {
            return; // pre-6.5 kernels: the read-back after ADD_DEV still catches a dropped flag
        }
        var missing = wanted & ~offered;
        if (missing != 0)
        {
            var names = string.Join(", ", UblkFeatureNames.Describe(missing).Where(f => f.Present).Select(f => $"{f.Name} (Linux {f.Since}+)"));
            throw new NotSupportedException($"this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer {names}");
        }
    }

    /// <summary>
    /// USER_COPY when the target moves request data itself (one copy instead of two) and the driver
    /// offers it; it is for privileged devices only, and without it the target works as any other.
    /// </summary>
    private static bool WantsUserCopy(ControlDevice control, BlockTarget target, UblkFeatures wanted)
    {
        if (target is not IUserCopyTarget { WantsUserCopy: true } || (wanted & UblkFeatures.UnprivilegedDev) != 0)
        {
            return false;
        }
        try
        {
            return (control.GetFeatures() & UblkFeatures.UserCopy) != 0;
        }
        catch (ErrnoException)
        {
            return false;
        }
    }

    /// <summary>
    /// AUTO_BUF_REG where <paramref name="mode"/> asks for it and the target, the caller and the
    /// driver allow it; with USER_COPY beside it (same kernels) for the requests that still need their
    /// bytes: one whose buffer the driver could not install, or a read past a short file's end,
    /// whose tail is zeroed through /dev/ublkcN. On throws the reason it cannot be had (the CLI asks
    /// before it starts a daemon).
    /// </summary>
    public static UblkFeatures ZeroCopyFlags(ControlDevice control, BlockTarget target, ZeroCopyMode mode, bool unprivileged)
    {
        if (mode == ZeroCopyMode.Off)
        {
            return 0;
        }
        string? refusal = null;
        var offered = Offered(control);
        if (!target.SupportsZeroCopy)
        {
            refusal = target.Kind is "loop" or "cow"
                ? $"the {target.Kind} target serves these files off the ring (on tmpfs or ramfs, or with --io sync): zero copy needs --io ring"
                : $"the {target.Kind} target works on each request's bytes in the daemon's memory, so it cannot use zero copy";
        }
        else if (unprivileged)
        {
            refusal = "the kernel gives devices that users add (UNPRIVILEGED_DEV) no zero copy: a daemon that did not fill a read's pages would leak kernel memory";
        }
        else if (mode == ZeroCopyMode.Explicit ? (offered & UblkFeatures.SupportZeroCopy) == 0 : (offered & (UblkFeatures.AutoBufReg | UblkFeatures.SupportZeroCopy)) == 0)
        {
            refusal = mode == ZeroCopyMode.Explicit
                ? $"this kernel's ublk driver ({Environment.OSVersion.Version}) does not offer SUPPORT_ZERO_COPY (Linux 6.15+)"
                : $"this kernel's ublk driver ({Environment.OSVersion.Version}) offers neither AUTO_BUF_REG (Linux 6.16+) nor SUPPORT_ZERO_COPY (6.15+)";
        }
        if (refusal is not null)
        {
            return mode is ZeroCopyMode.On or ZeroCopyMode.Explicit
                ? throw new NotSupportedException($"--zero-copy {(mode == ZeroCopyMode.On ? "on" : "explicit")}: {refusal}")
                : UblkFeatures.None;
        }
        // AUTO_BUF_REG where offered (no command per request); SUPPORT_ZERO_COPY's explicit
        // registration where not (6.15), or when asked for.
        var registration = mode != ZeroCopyMode.Explicit && (offered & UblkFeatures.AutoBufReg) != 0 ? UblkFeatures.AutoBufReg : UblkFeatures.SupportZeroCopy;
        return registration | (offered & UblkFeatures.UserCopy);
    }

    /// <summary>Why a device with these options cannot get BATCH_IO, or null.</summary>
    public static string? BatchRefusal(DeviceOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        // The driver sizes each queue's event fifo by the depth, and a kfifo needs 2 slots.
        return options.Depth < 2 ? "a batched queue needs a depth of 2 or more (the driver refuses depth 1 at ADD_DEV with EINVAL)" : null;
    }

    private static void ValidateTarget(BlockTarget target)
    {
        var lbs = target.LogicalBlockSize;
        if (lbs is < 512 or > 4096 || (lbs & (lbs - 1)) != 0)
        {
            throw new ArgumentException($"The logical block size must be a power of two from 512 to 4096, not {lbs}");
        }
        if (target.Size <= 0 || target.Size % lbs != 0)
        {
            throw new ArgumentException($"The device size must be a positive multiple of {lbs} bytes, not {target.Size}");
        }
    }

    private void SetUp(Action<Exception>? onFatal, bool recovering)
    {
        onFatal ??= ExitOnFailure(_logger);
        var unprivileged = (Info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0;
        if (!recovering)
        {
            if (unprivileged)
            {
                WaitUntilOwned();
            }
            Control.SetParams(Id, BuildParams());
        }
        _charFd = OpenCharDevice(CharPath, unprivileged);
        for (var q = 0; q < _queues.Length; q++)
        {
            int[]? cpus = null;
            if (_options.PinQueues)
            {
                try
                {
                    cpus = Control.GetQueueAffinity(Id, q);
                }
                catch (ErrnoException)
                {
                    // Pinning is an optimisation; serve unpinned.
                }
            }
            // A recovered device keeps the flags it was created with: USER_COPY is the kernel's say, not the target's.
            var userCopy = (Info.flags & (ulong)UblkFeatures.UserCopy) != 0;
            var zeroCopy = (Info.flags & (ulong)(UblkFeatures.AutoBufReg | UblkFeatures.SupportZeroCopy)) != 0;
            var explicitZeroCopy = zeroCopy && (Info.flags & (ulong)UblkFeatures.AutoBufReg) == 0;
            var batch = (Info.flags & (ulong)UblkFeatures.BatchIo) != 0;
            _queues[q] = new UblkQueue(q, Info.queue_depth, (int)Info.max_io_buf_bytes, _charFd, _target, userCopy, zeroCopy, explicitZeroCopy, batch, cpus, onFatal, _options.LoggerFactory.CreateLogger<UblkQueue>());
            _queues[q].Start(TimeSpan.FromSeconds(30));
        }
        if (recovering)
        {
            Control.EndUserRecovery(Id, Environment.ProcessId, _options.StartTimeout);
        }
        else
        {
            try
            {
                Control.StartDevice(Id, Environment.ProcessId, _options.StartTimeout);
            }
            catch (TimeoutException e)
            {
                throw new TimeoutException(
                    $"ublk device {Id} did not start within {_options.StartTimeout.TotalSeconds:0.#} s: START_DEV reads the partition table through the target, which did not answer in time", e);
            }
            if ((Info.flags & (ulong)UblkFeatures.UnprivilegedDev) != 0)
            {
                WaitUntilBlockDeviceOwned();
            }
        }
    }

    // /dev/ublkbN appears at START_DEV, root's, and udev hands it to the user a moment later (as it
    // did /dev/ublkcN): the path printed to the user must be theirs to open. Bounded as above.
    private void WaitUntilBlockDeviceOwned()
    {
        var deadline = Environment.TickCount64 + (long)OwnershipTimeout.TotalMilliseconds;
        while (Libc.access(BlockPath, Libc.R_OK | Libc.W_OK) != 0)
        {
            if (Environment.TickCount64 > deadline)
            {
                throw new UnauthorizedAccessException(
                    $"{BlockPath} is still not yours {OwnershipTimeout.TotalSeconds:0} s after device {Id} started: the udev rule that hands a user's devices to them is missing or failed ('ublksharp setup-unprivileged', as root, installs it)");
            }
            Thread.Sleep(20);
        }
    }

    private UblkParams BuildParams()
    {
        var t = _target;
        var p = new UblkParams { types = UblkParams.TypeBasic };
        p.basic.logical_bs_shift = (byte)Log2(t.LogicalBlockSize);
        p.basic.physical_bs_shift = (byte)Log2(Math.Max(t.PhysicalBlockSize, t.LogicalBlockSize));
        p.basic.io_min_shift = p.basic.logical_bs_shift;
        p.basic.io_opt_shift = p.basic.physical_bs_shift;
        p.basic.max_sectors = Info.max_io_buf_bytes >> 9;
        p.basic.dev_sectors = (ulong)t.Size >> 9;
        if (t.IsReadOnly)
        {
            p.basic.attrs |= ParamBasic.AttrReadOnly;
        }
        if (t.IsRotational)
        {
            p.basic.attrs |= ParamBasic.AttrRotational;
        }
        if (t.HasVolatileCache)
        {
            // FLUSH is delivered only with a volatile cache, and FUA only with both attributes.
            p.basic.attrs |= ParamBasic.AttrVolatileCache | ParamBasic.AttrFua;
        }
        if (!t.IsReadOnly && (t.CanDiscard || t.CanWriteZeroes))
        {
            p.types |= UblkParams.TypeDiscard;
            p.discard.discard_granularity = (uint)Math.Max(t.PhysicalBlockSize, t.LogicalBlockSize);
            p.discard.max_discard_sectors = t.CanDiscard ? 1u << 21 : 0;
            p.discard.max_write_zeroes_sectors = t.CanWriteZeroes ? 1u << 21 : 0;
            p.discard.max_discard_segments = 1;
        }
        return p;
    }

    private static int Log2(int v) => 31 - System.Numerics.BitOperations.LeadingZeroCount((uint)v);

    /// <summary>How long a user's new device may take to become theirs (udev runs the chown helper).</summary>
    internal static TimeSpan OwnershipTimeout { get; } = TimeSpan.FromSeconds(10);

    // A user's device is created root's, like any device node; the udev rule (setup-unprivileged)
    // hands /dev/ublkcN and /dev/ublkbN to its owner a moment later. Until then SET_PARAMS, which
    // checks the caller's access to /dev/ublkcN, fails: wait for the hand-over, bounded
    // (ublksrv issue 187 is that race, lost).
    private void WaitUntilOwned()
    {
        var deadline = Environment.TickCount64 + (long)OwnershipTimeout.TotalMilliseconds;
        Span<byte> info = stackalloc byte[64];
        while (true)
        {
            // A node that is not there yet (udev creating it) is waited for like one not yet ours.
            var res = File.Exists(CharPath)
                ? Control.Execute(UblkCommands.GetDevInfo, new CtrlCmd { dev_id = Id, queue_id = ushort.MaxValue }, default, info, ControlDevice.DefaultTimeout)
                : -Errno.ENOENT;
            if (res == 0 && Libc.access(CharPath, Libc.R_OK | Libc.W_OK) == 0)
            {
                return;
            }
            if (res is not (-Errno.EACCES or -Errno.EPERM or -Errno.ENOENT) && res != 0)
            {
                throw new ErrnoException(-res, "UBLK_CMD_GET_DEV_INFO", $"device {Id}");
            }
            if (Environment.TickCount64 > deadline)
            {
                throw new UnauthorizedAccessException(
                    $"{CharPath} is still not yours {OwnershipTimeout.TotalSeconds:0} s after the kernel added device {Id} for you: the udev rule that hands a user's devices to them is missing ('ublksharp setup-unprivileged', as root, installs it). Until then you cannot delete it either: 'ublksharp del -n {Id}' as root does");
            }
            Thread.Sleep(20);
        }
    }

    private static int OpenCharDevice(string path, bool unprivileged)
    {
        // udev may hold the new node for a moment (ublksrv retries too), or create it late; a
        // user's node may still be root's until the udev helper gives it to them.
        var deadline = Environment.TickCount64 + (unprivileged ? (long)OwnershipTimeout.TotalMilliseconds : 3000);
        while (true)
        {
            try
            {
                return Libc.OpenOrThrow(path, Libc.O_RDWR);
            }
            catch (ErrnoException e) when ((e.Errno is Errno.EBUSY or Errno.ENOENT || (unprivileged && e.Errno == Errno.EACCES)) && Environment.TickCount64 < deadline)
            {
                Thread.Sleep(20);
            }
        }
    }

    /// <summary>Waits until every queue has ended (after a STOP_DEV from anywhere). False on timeout.</summary>
    public bool WaitForStop(TimeSpan timeout)
    {
        var infinite = timeout == Timeout.InfiniteTimeSpan;
        var deadline = infinite ? DateTime.MaxValue : DateTime.UtcNow + timeout;
        foreach (var q in _queues)
        {
            if (q is not null && !q.Join(infinite ? Timeout.InfiniteTimeSpan : Max(deadline - DateTime.UtcNow, TimeSpan.Zero)))
            {
                return false;
            }
        }
        return true;
    }

    private static TimeSpan Max(TimeSpan a, TimeSpan b) => a > b ? a : b;

    /// <summary>
    /// STOP_DEV (IO in flight drains through the still-running queues), then waits for the queue
    /// threads to finish, closes the char device and DEL_DEV. Safe to call more than once.
    /// </summary>
    public void Dispose()
    {
        if (_deleted)
        {
            return;
        }
        try
        {
            Control.StopDevice(Id, _options.StopTimeout);
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
            // Someone else deleted it already.
        }
        if (!WaitForStop(_options.StopTimeout))
        {
            throw new TimeoutException($"ublk device {Id}: queues did not end within {_options.StopTimeout.TotalSeconds} s of STOP_DEV");
        }
        Delete();
    }

    // A failed create: make the never-started (or half-started) device go away. It never throws,
    // so the caller reports what made the create fail.
    private void Abort()
    {
        try
        {
            // A START_DEV that timed out is still scanning partitions, holding the device's lock:
            // this STOP_DEV waits for it.
            Control.StopDevice(Id, _options.StopTimeout);
            WaitForStop(_options.StopTimeout);
        }
        catch (Exception e) when (e is ErrnoException or TimeoutException or UblkUnavailableException)
        {
            RuntimeLog.CleanUpFailed(_logger, Id, e.Message);
        }
        try
        {
            Delete();
        }
        catch (Exception e) when (e is ErrnoException or TimeoutException or UblkUnavailableException)
        {
            RuntimeLog.DeleteFailed(_logger, Id, e.Message);
        }
    }

    /// <summary>
    /// Deletes a stopped device. DEL_DEV_ASYNC (6.9+) returns at once, and the kernel frees the id
    /// when the last opener of /dev/ublkbN closes; the synchronous DEL_DEV would wait for that
    /// opener, which may never come. An unknown id counts as deleted.
    /// </summary>
    public static void DeleteDevice(ControlDevice control, uint id, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(control);
        try
        {
            try
            {
                control.DeleteDeviceAsync(id);
            }
            catch (ErrnoException e) when (e.Errno is Errno.EOPNOTSUPP or Errno.EINVAL)
            {
                control.DeleteDevice(id, timeout);
            }
        }
        catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
        {
        }
    }

    /// <summary>
    /// Stops device <paramref name="id"/> unless its block device is open; false when it is (the device
    /// then serves on, untouched). Where the device has SAFE_STOP_DEV (the 7.0+ driver sets it on
    /// every device) the kernel decides with TRY_STOP_DEV under the disk's open mutex and refuses
    /// later opens, so no opener can slip in between the check and the stop. Elsewhere (6.12) it is
    /// a check, then STOP_DEV: only mounts and O_EXCL openers count, and an opener that comes in
    /// between sees its IO fail. A brief opener (udev's probe) is waited out for
    /// <paramref name="transientWait"/>; a mount or O_EXCL holder is busy at once. A device that is
    /// not live (its daemon gone) is stopped whoever holds it, as `del` always did.
    /// </summary>
    public static bool TryStop(ControlDevice control, uint id, TimeSpan stopTimeout, TimeSpan transientWait)
    {
        ArgumentNullException.ThrowIfNull(control);
        var info = control.GetDeviceInfo(id);
        var block = $"/dev/ublkb{id}";
        // A device whose daemon is gone (QUIESCED, FAIL_IO) is stopped as before: its openers' IO
        // is held or failing already, and stopping it is how they are let go.
        if ((DeviceState)info.state != DeviceState.Live)
        {
            control.StopDevice(id, stopTimeout);
            return true;
        }
        if ((info.flags & (ulong)UblkFeatures.SafeStopDev) == 0)
        {
            if (BlockDevices.IsExclusivelyHeld(block))
            {
                return false;
            }
            control.StopDevice(id, stopTimeout);
            return true;
        }
        var deadline = Environment.TickCount64 + (long)transientWait.TotalMilliseconds;
        while (true)
        {
            var res = control.TryStopDevice(id, stopTimeout);
            switch (-res)
            {
                case 0:
                    return true;
                case Errno.ENODEV when (DeviceState)control.GetDeviceInfo(id).state != DeviceState.Live:
                    // No disk (never started, or stopped already): nothing can hold it; make sure its queues end.
                    control.StopDevice(id, stopTimeout);
                    return true;
                case Errno.EBUSY:
                    if (BlockDevices.IsExclusivelyHeld(block) || Environment.TickCount64 >= deadline)
                    {
                        return false;
                    }
                    Thread.Sleep(20);
                    break;
                default:
                    throw new ErrnoException(-res, "UBLK_U_CMD_TRY_STOP_DEV", $"device {id}");
            }
        }
    }

    // Queues, the char device and the control device of this process; the kernel's device stays.
    // A queue still serving (its device was not stopped: a failed recovery, a stop that timed out)
    // is told to end, or its thread would keep the ring, the tags and /dev/ublkcN for good.
    private void ReleaseLocal()
    {
        Metrics.UblkMeter.Remove(this);
        foreach (var q in _queues)
        {
            q?.RequestStop();
        }
        foreach (var q in _queues)
        {
            if (q is null)
            {
                continue;
            }
            if (q.Join(_options.StopTimeout))
            {
                q.Dispose();
            }
            else
            {
                // Its thread still uses what Dispose would free: leave it be.
                RuntimeLog.QueueDidNotEnd(_logger, Id, q.QueueId, _options.StopTimeout.TotalSeconds);
            }
        }
        if (_charFd >= 0)
        {
            _ = Libc.close(_charFd);
            _charFd = -1;
        }
    }

    private void Delete()
    {
        if (_deleted)
        {
            return;
        }
        _deleted = true;
        ReleaseLocal();
        try
        {
            DeleteDevice(Control, Id, _options.StopTimeout);
        }
        finally
        {
            _control.Dispose();
        }
    }
}
