using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// QUIESCE_DEV (6.16+): a live device with IO in flight is quiesced and recovered by a new daemon,
/// with no read failing; on 6.12 the library refuses it. The kernel aborts only the fetches parked
/// at that instant (ublk_cancel_dev after ublk_wait_for_idle_io, which waits for one idle tag per
/// queue, not all): a request the daemon holds then is committed later and its fetch stays parked.
/// The variants hold every request in the target (a 100 ms delay on the queue's ring) when QUIESCE
/// arrives, with depth 1 (no fetch parked at all, so no ABORT on that queue) to 128; another
/// quiesces and recovers one device ten times in one process with a null target.
/// </summary>
[Trait("kernel", "7.3")]
public class QuiesceTests
{
    private const long Size = 16 << 20;

    [Fact]
    public void QuiesceHandsALiveDeviceWithIoInFlightToANewDaemon()
        => QuiesceAndRecover(queues: 2, depth: 16, holdMs: 0, rounds: 1, progress: 200);

    [Theory]
    [InlineData(1, 1)]
    [InlineData(2, 16)]
    [InlineData(1, 128)]
    public void QuiesceWaitsForRequestsHeldInTheTarget(int queues, int depth)
        => QuiesceAndRecover(queues, depth, holdMs: 100, rounds: 2, progress: 8);

    [Fact]
    public void QuiesceAndRecoverTenTimesInOneProcess()
        => QuiesceAndRecover(queues: 2, depth: 16, holdMs: 0, rounds: 10, progress: 50);

    /// <summary>
    /// A batched device (7.0+) is not quiesced: QUIESCE_DEV would fail its requests with EIO until
    /// the next daemon attaches. The refusal says why, and the device keeps serving.
    /// </summary>
    [Fact]
    public void ABatchedDeviceRefusesQuiesceAndKeepsServing()
    {
        VmEnvironment.RequireDriver();
        if (!ZeroCopyTests.BatchOffered)
        {
            Assert.Throws<NotSupportedException>(() => UblkDevice.Create(new NullTarget(Size), new DeviceOptions { Recovery = RecoveryMode.Reissue, Batch = BatchMode.On }));
            return;
        }
        using var device = UblkDevice.Create(new NullTarget(Size), new DeviceOptions { Queues = 1, Depth = 16, Recovery = RecoveryMode.Reissue, Batch = BatchMode.On });
        Assert.NotEqual(0ul, device.Info.flags & (ulong)UblkFeatures.BatchIo);
        var e = Assert.Throws<NotSupportedException>(() => device.Quiesce(TimeSpan.FromSeconds(5)));
        Assert.Contains("batched", e.Message, StringComparison.Ordinal);
        Assert.Equal(DeviceState.Live, CliDevices.State(device.Id));
        Assert.Equal(new byte[4096], DirectIo.Read(device.BlockPath, 0, 4096));
        Assert.Equal(0, device.Errors);
    }

    private static BlockTarget Target(int holdMs)
        => holdMs == 0 ? new NullTarget(Size) : new FaultTarget(new NullTarget(Size), new FaultSchedule { Delay = 1, DelayMs = holdMs });

    private static unsafe void QuiesceAndRecover(int queues, int depth, int holdMs, int rounds, long progress)
    {
        VmEnvironment.RequireDriver();
        // A queue that never ends fails the round in 20 s, not the 60 s default.
        var options = new DeviceOptions { Queues = queues, Depth = depth, Recovery = RecoveryMode.On, PinQueues = false, StopTimeout = TimeSpan.FromSeconds(20) };
        var device = UblkDevice.Create(Target(holdMs), options);
        var id = device.Id;
        try
        {
            if (!ControlFeatureTests.Offers(UblkFeatures.Quiesce))
            {
                var e = Assert.Throws<NotSupportedException>(() => device.Quiesce(TimeSpan.FromSeconds(5)));
                Assert.Contains("QUIESCE", e.Message, StringComparison.Ordinal);
                Assert.Equal(DeviceState.Live, CliDevices.State(device.Id));
                return;
            }
            Assert.NotEqual(0ul, device.Info.flags & (ulong)UblkFeatures.Quiesce);
            var path = device.BlockPath;
            long reads = 0, failed = 0, inFlight = 0;
            using var stop = new ManualResetEventSlim();
            var readers = Enumerable.Range(0, 4).Select(n => new Thread(() =>
            {
                var fd = Libc.OpenOrThrow(path, Libc.O_RDONLY | Libc.O_DIRECT | Libc.O_CLOEXEC);
                var buffer = NativeMemory.AlignedAlloc(65536, 4096);
                try
                {
                    var offset = 0L;
                    while (!stop.IsSet)
                    {
                        Interlocked.Increment(ref inFlight);
                        var n2 = Libc.pread(fd, buffer, 65536, offset);
                        Interlocked.Decrement(ref inFlight);
                        if (n2 == 65536)
                        {
                            Interlocked.Increment(ref reads);
                        }
                        else
                        {
                            Interlocked.Increment(ref failed);
                        }
                        offset = (offset + (65536 * (n + 1))) % Size & ~65535L;
                    }
                }
                finally
                {
                    NativeMemory.AlignedFree(buffer);
                    _ = Libc.close(fd);
                }
            })
            { IsBackground = true }).ToList();
            readers.ForEach(t => t.Start());
            var quiesceTimes = new List<TimeSpan>();
            var recoverTimes = new List<TimeSpan>();
            var heldAtQuiesce = new List<long>();
            for (var round = 0; round < rounds; round++)
            {
                var what = $"round {round + 1} of {rounds}";
                var before = Interlocked.Read(ref reads);
                Assert.True(Lifecycle.PollFor(() => Interlocked.Read(ref reads) >= before + progress, TimeSpan.FromSeconds(60)), $"{what}: the readers made no progress");
                heldAtQuiesce.Add(Interlocked.Read(ref inFlight));
                var sw = Stopwatch.StartNew();
                try
                {
                    Assert.True(device.Quiesce(TimeSpan.FromSeconds(10)), $"{what}: QUIESCE_DEV: IO did not drain in 10 s");
                }
                catch (TimeoutException e)
                {
                    Assert.Fail($"{what}: {e.Message}");
                }
                quiesceTimes.Add(sw.Elapsed);
                Assert.Equal(DeviceState.Quiesced, CliDevices.State(id));
                // Quiesced: new reads are held, not failed; those the daemon held were answered before it let go.
                var held = Interlocked.Read(ref reads);
                Thread.Sleep(200);
                Assert.True(Interlocked.Read(ref reads) - held <= 4, $"{what}: reads completed while the device was quiesced");
                Assert.Equal(0, Interlocked.Read(ref failed));
                sw.Restart();
                device = UblkDevice.Recover(id, Target(holdMs), options);
                recoverTimes.Add(sw.Elapsed);
                Assert.Equal(DeviceState.Live, CliDevices.State(id));
            }
            var resumed = Interlocked.Read(ref reads);
            Assert.True(Lifecycle.PollFor(() => Interlocked.Read(ref reads) >= resumed + progress, TimeSpan.FromSeconds(60)), "IO did not resume after the last recovery");
            stop.Set();
            readers.ForEach(t => Assert.True(t.Join(TimeSpan.FromSeconds(30)), "a reader hung"));
            Assert.Equal(0, Interlocked.Read(ref failed));
            VmEnvironment.Figure($"quiesce ({queues} queue(s), depth {depth}, {(holdMs > 0 ? $"every request held {holdMs} ms" : "null target")}): {rounds} rounds, " +
                $"reads in flight at QUIESCE {string.Join("/", heldAtQuiesce)}, quiesce max {Lifecycle.Seconds(quiesceTimes.Max())}, recovery max {Lifecycle.Seconds(recoverTimes.Max())}, " +
                $"{Interlocked.Read(ref reads)} reads, {Interlocked.Read(ref failed)} failed");
        }
        finally
        {
            device.Dispose();
            // A round that failed between the quiesce and the recovery leaves the device quiesced, with no daemon.
            using var control = ControlDevice.Open();
            if (VmEnvironment.DeviceIds().Contains(id))
            {
                control.StopDevice(id, TimeSpan.FromSeconds(30));
                UblkDevice.DeleteDevice(control, id, TimeSpan.FromSeconds(30));
            }
        }
    }
}
