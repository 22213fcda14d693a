using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// `del` (<see cref="UblkDevice.TryStop"/>) against an opener that opens /dev/ublkbN at the worst
/// moment, as a mounting tool would (O_RDONLY, and O_RDONLY|O_EXCL on every other iteration), reads a
/// block and closes, in a loop, while the stop runs. 1,000 iterations in this process, on 4 devices at once.
/// Asserted on every kernel: each stop either reports busy, and then the device is still LIVE and
/// serves a read, or stops the device, and then the opener ends within a bound, its last open failing
/// with ENOENT or ENXIO (nothing hangs), and the device deletes cleanly.
/// Half the workers' openers drop CAP_SYS_ADMIN from their thread's effective set, as an
/// unprivileged mounting tool would run.
/// Asserted where the device has SAFE_STOP_DEV (7.0+; the kernel checks disk_openers under the
/// disk's open mutex, sets ub->block_open, lets the mutex go and stops): no read fails of an opener
/// that was open before TRY_STOP_DEV was sent, nor on a device the stop left busy, and no read of an
/// unprivileged opener fails at all. A privileged opener's read may return 0 bytes: ublk_open
/// returns 0 for CAP_SYS_ADMIN before it looks at block_open, so such an open succeeds between the
/// check and del_gendisk, and its read comes after __blk_mark_disk_dead set the capacity to 0
/// (blkdev_read_iter returns 0 at or past the end). Those are counted and reported.
/// On 6.12 (check, then STOP_DEV) reads may fail (the race TRY_STOP_DEV closes): counted, reported.
/// </summary>
[Trait("kernel", "7.3")]
[Trait("boot", "shared")]
public class SafeStopTests
{
    private const int Iterations = 1000;

    // Workers, each with its own devices and opener: add_disk/del_gendisk wait more than they compute.
    private const int Workers = 4;

    [Fact]
    public void StopRacingAnOpenerIsEitherBusyOrClean()
    {
        VmEnvironment.RequireDriver();
        bool safe;
        using (var control = ControlDevice.Open())
        {
            safe = (control.GetFeatures() & UblkFeatures.SafeStopDev) != 0;
        }
        Assert.Equal(Environment.OSVersion.Version.Major >= 7, safe);
        var clock = Stopwatch.StartNew();
        var results = Enumerable.Range(0, Workers)
            .Select(w => Task.Factory.StartNew(() => Race(w, Iterations / Workers, safe), TaskCreationOptions.LongRunning))
            .ToArray();
        var counts = results.Select(t => t.GetAwaiter().GetResult()).ToArray();
        var busy = counts.Sum(c => c.Busy);
        var stopped = counts.Sum(c => c.Stopped);
        var failedReads = counts.Sum(c => c.Failed.Total);
        var privileged = Sum(counts.Where(c => c.Privileged));
        var unprivileged = Sum(counts.Where(c => !c.Privileged));
        VmEnvironment.Figure($"safe stop ({(safe ? "TRY_STOP_DEV" : "check, then STOP_DEV")}) on {VmEnvironment.KernelRelease}: {Iterations} stops against a racing opener " +
            $"in {clock.Elapsed.TotalSeconds:0} s: {busy} busy, {stopped} stopped, {failedReads} opener reads failed; " +
            $"privileged openers {privileged}, unprivileged {unprivileged}");
        Assert.Equal(Iterations, busy + stopped);
        if (safe)
        {
            Assert.Equal(0, privileged.OpenBeforeStop);
            Assert.Equal(0, privileged.OnBusy);
            Assert.Equal(new FailedReads(0, 0, 0), unprivileged);
        }
    }

    /// <summary>
    /// Failed opener reads by when the open returned against the TRY_STOP_DEV call: before it was
    /// sent, on a device it left busy, or after it was sent on a device it stopped.
    /// </summary>
    private readonly record struct FailedReads(int OpenBeforeStop, int OnBusy, int OpenDuringStop)
    {
        public int Total => OpenBeforeStop + OnBusy + OpenDuringStop;

        public override string ToString() => $"{Total} failed reads ({OpenBeforeStop} opened before TRY_STOP, {OnBusy} on a busy device, {OpenDuringStop} opened during a stop that succeeded)";
    }

    private static FailedReads Sum(IEnumerable<(int Busy, int Stopped, bool Privileged, FailedReads Failed)> counts)
        => counts.Aggregate(new FailedReads(), (a, c) => new FailedReads(a.OpenBeforeStop + c.Failed.OpenBeforeStop, a.OnBusy + c.Failed.OnBusy, a.OpenDuringStop + c.Failed.OpenDuringStop));

    private static (int Busy, int Stopped, bool Privileged, FailedReads Failed) Race(int worker, int iterations, bool safe)
    {
        using var control = ControlDevice.Open();
        int busy = 0, stopped = 0;
        var failed = new FailedReads();
        // Odd workers' openers run without CAP_SYS_ADMIN, which ublk_open lets through whatever block_open says.
        var privileged = worker % 2 == 0;
        var random = new Random(12 + worker);
        UblkDevice? device = null;
        try
        {
            for (var i = 0; i < iterations; i++)
            {
                var what = $"worker {worker}, iteration {i}";
                device ??= UblkDevice.Create(new NullTarget(8 << 20), new DeviceOptions { Depth = 16, PinQueues = false });
                Assert.Equal(safe, (device.Info.flags & (ulong)UblkFeatures.SafeStopDev) != 0);
                using var opener = new Opener(device.BlockPath, exclusive: i % 2 == 1, privileged);
                // The stop lands somewhere in the opener's open/read/close cycle.
                opener.WaitForFirstRead(TimeSpan.FromSeconds(30));
                Thread.SpinWait(random.Next(0, 20000));
                var sent = Stopwatch.GetTimestamp();
                var wasStopped = UblkDevice.TryStop(control, device.Id, TimeSpan.FromSeconds(30), TimeSpan.Zero);
                if (wasStopped)
                {
                    stopped++;
                    Assert.True(opener.WaitUntilGone(TimeSpan.FromSeconds(30)), $"{what}: the opener still runs 30 s after the stop");
                    Assert.True(opener.GoneErrno is Errno.ENOENT or Errno.ENXIO, $"{what}: the opener's open failed with {Errno.Describe(opener.GoneErrno)}");
                    var id = device.Id;
                    device.Dispose();
                    device = null;
                    // DEL_DEV_ASYNC: the id goes when the kernel drops its last reference, soon after.
                    Assert.True(IsGone(control, id, TimeSpan.FromSeconds(30)), $"{what}: device {id} still exists 30 s after its delete");
                }
                else
                {
                    busy++;
                    opener.Stop(TimeSpan.FromSeconds(30));
                    Assert.Equal(DeviceState.Live, (DeviceState)control.GetDeviceInfo(device.Id).state);
                    Assert.Equal(4096, ReadBlock(device.BlockPath));
                }
                Assert.True(opener.UnexpectedErrno == 0, $"{what}: the opener saw {Errno.Describe(opener.UnexpectedErrno)}");
                foreach (var (openedAt, errno) in opener.FailedReads)
                {
                    // An open that returned before TRY_STOP_DEV was sent and read after it: still
                    // open at the kernel's check, so the stop must have been refused.
                    failed = !wasStopped ? failed with { OnBusy = failed.OnBusy + 1 }
                        : openedAt < sent ? failed with { OpenBeforeStop = failed.OpenBeforeStop + 1 }
                        : failed with { OpenDuringStop = failed.OpenDuringStop + 1 };
                    if (safe)
                    {
                        VmEnvironment.Figure($"safe stop: {what}: a {(privileged ? "privileged" : "unprivileged")} opener's read failed (errno {errno}), " +
                            $"opened {Stopwatch.GetElapsedTime(sent, openedAt).TotalMilliseconds:0.000} ms after TRY_STOP_DEV was sent, which {(wasStopped ? "stopped the device" : "found it busy")}");
                    }
                }
            }
        }
        finally
        {
            device?.Dispose();
        }
        return (busy, stopped, privileged, failed);
    }

    private static bool IsGone(ControlDevice control, uint id, TimeSpan timeout)
    {
        var deadline = Environment.TickCount64 + (long)timeout.TotalMilliseconds;
        while (true)
        {
            try
            {
                control.GetDeviceInfo(id);
            }
            catch (ErrnoException e) when (e.Errno == Errno.ENODEV)
            {
                return true;
            }
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }
            Thread.Sleep(5);
        }
    }

    private static unsafe int ReadBlock(string path)
    {
        var fd = Libc.OpenOrThrow(path, Libc.O_RDONLY | Libc.O_CLOEXEC);
        try
        {
            var buffer = stackalloc byte[4096];
            return (int)Libc.pread(fd, buffer, 4096, 0);
        }
        finally
        {
            _ = Libc.close(fd);
        }
    }

    /// <summary>Opens, reads a block, closes, again and again, until stopped or the device is gone.</summary>
    private sealed unsafe class Opener : IDisposable
    {
        private readonly string _path;
        private readonly int _flags;
        private readonly bool _privileged;
        private readonly Thread _thread;
        private readonly ManualResetEventSlim _firstRead = new();
        private volatile bool _stop;
        private volatile string? _setupError;

        public Opener(string path, bool exclusive, bool privileged)
        {
            _path = path;
            _flags = Libc.O_RDONLY | Libc.O_CLOEXEC | (exclusive ? Libc.O_EXCL : 0);
            _privileged = privileged;
            _thread = new Thread(Run) { IsBackground = true, Name = "racing opener" };
            _thread.Start();
        }

        public int GoneErrno { get; private set; }

        public int UnexpectedErrno { get; private set; }

        /// <summary>Each read that did not return the block: when its open returned (Stopwatch ticks), and its errno (0 for a short read).</summary>
        public List<(long OpenedAt, int Errno)> FailedReads { get; } = [];

        public void WaitForFirstRead(TimeSpan timeout) => Assert.True(_firstRead.Wait(timeout), $"the opener never read a block {_setupError}");

        public bool WaitUntilGone(TimeSpan timeout) => _thread.Join(timeout);

        public void Stop(TimeSpan timeout)
        {
            _stop = true;
            Assert.True(_thread.Join(timeout), "the opener did not end");
        }

        private void Run()
        {
            if (!_privileged)
            {
                try
                {
                    Capabilities.DropSysAdminFromThisThread();
                }
                catch (Exception e)
                {
                    _setupError = e.Message; // said by WaitForFirstRead
                    return;
                }
            }
            var buffer = stackalloc byte[4096];
            while (!_stop)
            {
                var fd = Libc.open(_path, _flags, 0);
                var openedAt = Stopwatch.GetTimestamp();
                if (fd < 0)
                {
                    var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
                    if (errno == Errno.EBUSY)
                    {
                        continue; // another O_EXCL opener (the 6.12 check) has it this instant
                    }
                    if (errno is not (Errno.ENOENT or Errno.ENXIO))
                    {
                        UnexpectedErrno = errno;
                    }
                    GoneErrno = errno;
                    return;
                }
                var n = Libc.pread(fd, buffer, 4096, 0);
                if (n != 4096)
                {
                    FailedReads.Add((openedAt, n < 0 ? System.Runtime.InteropServices.Marshal.GetLastPInvokeError() : 0));
                }
                _ = Libc.close(fd);
                _firstRead.Set();
            }
        }

        public void Dispose()
        {
            _stop = true;
            _thread.Join(TimeSpan.FromSeconds(30));
            _firstRead.Dispose();
        }
    }
}

/// <summary>Per-thread capabilities (capget/capset act on the calling thread only).</summary>
internal static unsafe class Capabilities
{
    private const uint Version3 = 0x20080522; // _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    private const int SysAdmin = 21; // CAP_SYS_ADMIN

    private static (long Get, long Set) Numbers => System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture switch
    {
        System.Runtime.InteropServices.Architecture.X64 => (125, 126),
        System.Runtime.InteropServices.Architecture.Arm64 => (90, 91),
        var a => throw new PlatformNotSupportedException($"capget/capset numbers for {a}"),
    };

    /// <summary>Clears CAP_SYS_ADMIN from the calling thread's effective set (it stays permitted), and checks that it is gone.</summary>
    public static void DropSysAdminFromThisThread()
    {
        var header = stackalloc uint[2] { Version3, 0 }; // pid 0: this thread
        var data = stackalloc uint[6]; // { effective, permitted, inheritable } x 2
        if (Libc.syscall(Numbers.Get, (long)header, (long)data, 0, 0, 0, 0) < 0)
        {
            throw new ErrnoException(System.Runtime.InteropServices.Marshal.GetLastPInvokeError(), "capget");
        }
        data[0] &= ~(1u << SysAdmin);
        if (Libc.syscall(Numbers.Set, (long)header, (long)data, 0, 0, 0, 0) < 0)
        {
            throw new ErrnoException(System.Runtime.InteropServices.Marshal.GetLastPInvokeError(), "capset");
        }
        data[0] = uint.MaxValue;
        _ = Libc.syscall(Numbers.Get, (long)header, (long)data, 0, 0, 0, 0);
        if ((data[0] & (1u << SysAdmin)) != 0)
        {
            throw new InvalidOperationException("CAP_SYS_ADMIN is still effective after capset");
        }
    }
}
