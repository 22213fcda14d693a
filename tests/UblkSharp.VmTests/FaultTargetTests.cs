using UblkSharp.Interop;
using UblkSharp.Interop.IoUring;
using UblkSharp.Runtime;
using UblkSharp.Targets;

namespace UblkSharp.VmTests;

/// <summary>
/// The fault target: retryable faults (short IO, EAGAIN, delays) are retried by the runtime and
/// never seen by the client (see also <see cref="FioVerifyTests"/>, which runs the same schedule
/// through the CLI); hard faults (EIO) reach the client, and the daemon and device live on.
/// </summary>
[Trait("boot", "shared")]
public class FaultTargetTests
{
    [Fact]
    public void RetryableFaultsAreRetriedAndInvisible()
    {
        VmEnvironment.RequireDriver();
        Exception? fatal = null;
        var schedule = new FaultSchedule { Seed = 7, ShortIo = 0.2, Again = 0.1, Delay = 0.05 };
        using var target = new FaultTarget(new MemoryTarget(128 << 20), schedule);
        using var device = UblkDevice.Create(target, new DeviceOptions { Queues = 2, Depth = 64 }, e => fatal = e);
        var r = Fio.Verify(device.BlockPath, "32M", TimeSpan.FromMinutes(4));
        Fio.AssertVerified(r);
        Assert.Null(fatal);
        Assert.Equal(0, device.Errors);
        Assert.Equal(0, device.ExactlyOnceViolations);
        Assert.Equal(0, device.TargetExceptions);
        // The faults did happen: with 30 % of the backend steps short or EAGAIN, thousands were retried.
        Assert.True(device.Retries > r.TotalIos / 10, $"{device.Retries} backend steps retried for {r.TotalIos} IOs");
        VmEnvironment.Log($"{device.Completed} requests, {device.Retries} backend steps retried");
    }

    [Fact]
    public void HardFaultsReachTheClientAndTheDaemonKeepsServing()
    {
        VmEnvironment.RequireDriver();
        var since = DateTime.UtcNow;
        try
        {
            var dev = CliDevices.Add("-t fault --base mem --size 128M --eio 0.05 --seed 7 -q 2");
            var id = CliDevices.IdOf(dev);
            var pid = CliDevices.DaemonPid(id);

            var r = Fio.Verify(dev, "32M", TimeSpan.FromMinutes(4));
            Assert.True(r.ExitCode != 0 && r.Error == Errno.EIO, $"fio did not report EIO: {r}");
            Assert.Contains("Input/output error", r.Stderr, StringComparison.Ordinal);

            // The daemon is alive, the device live, and it still serves IO (each request fails with
            // probability 5 %, so some of ten reads succeed).
            Assert.True(Processes.IsAlive(pid), $"the daemon (pid {pid}) died of the injected faults:\n{CliDevices.DaemonLogs(since)}");
            Assert.Equal("live", CliDevices.List()[id].GetProperty("state").GetString());
            var served = 0;
            for (var i = 0; i < 10; i++)
            {
                try
                {
                    DirectIo.Read(dev, i * 65536L, 65536);
                    served++;
                }
                catch (IOException)
                {
                }
            }
            Assert.True(served > 0, "no read succeeded after the faults");
            // The daemon logged the failures it passed on.
            Assert.Contains("failed: EIO", CliDevices.DaemonLogs(since), StringComparison.Ordinal);

            CliDevices.Del(id);
            Assert.True(VmEnvironment.WaitFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(10)), $"the daemon (pid {pid}) outlived del");
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    public void EveryTargetEntryPointThatThrowsFailsOneRequestAndTheDaemonLives()
    {
        // A completion-fd backend (as librbd's) whose Reap throws now and then and once reports a
        // tag twice, under USER_COPY with a direct path that throws for one range.
        VmEnvironment.RequireDriver();
        Exception? fatal = null;
        using var target = new ThrowingTarget(64 << 20);
        using var device = UblkDevice.Create(target, new DeviceOptions { Queues = 1, Depth = 32 }, e => fatal = e);
        Assert.True((device.Info.flags & (ulong)UblkSharp.Ublk.UblkFeatures.UserCopy) != 0, "the device did not get USER_COPY");

        var r = Fio.Verify(device.BlockPath, "16M", TimeSpan.FromMinutes(4));
        Fio.AssertVerified(r);
        Assert.True(target.ReapThrows > 0, "Reap never threw");

        var e = Assert.ThrowsAny<IOException>(() => DirectIo.Read(device.BlockPath, ThrowingTarget.Poisoned, 4096));
        VmEnvironment.Log($"poisoned read: {e.Message}");
        var data = DirectIo.Read(device.BlockPath, 0, 65536); // and the device still serves
        Assert.Equal(65536, data.Length);

        Assert.Null(fatal);
        Assert.True(device.TargetExceptions >= target.ReapThrows + 1, $"{device.TargetExceptions} target exceptions counted for {target.ReapThrows} Reap throws and a throwing copy");
        // The tag reported twice was answered once; the second report was refused, not committed.
        Assert.Equal(1, device.ExactlyOnceViolations);
        VmEnvironment.Log($"{device.Completed} requests, {target.ReapThrows} Reap throws, {device.TargetExceptions} target exceptions");
    }

    /// <summary>mem, behind a backend that completes through an eventfd, with entry points that throw.</summary>
    private sealed unsafe class ThrowingTarget(long size) : WrapperTarget(new MemoryTarget(size)), IUserCopyTarget
    {
        public const long Poisoned = 48 << 20;

        private Backend? _backend;

        public int ReapThrows => _backend?.Throws ?? 0;

        public override string Kind => "throwing";

        public override UringBackend? CreateUringBackend(int queueId) => _backend = new Backend(Inner);

        bool IUserCopyTarget.WantsUserCopy => true;

        int IUserCopyTarget.ReadToRequest(int charFd, long requestPosition, long offset, int length)
            => offset >= Poisoned && offset < Poisoned + (1 << 20) ? throw new InvalidOperationException("poisoned range") : IUserCopyTarget.NotDirect;

        int IUserCopyTarget.WriteFromRequest(int charFd, long requestPosition, long offset, int length, bool fua) => IUserCopyTarget.NotDirect;

        private sealed class Backend : UringBackend
        {
            private readonly BlockTarget _mem;
            private readonly int _fd = Libc.eventfd(0, 0);
            private readonly Queue<(int Tag, int Result)> _done = new();
            private int _calls;
            private bool _doubled;

            public Backend(BlockTarget mem)
            {
                _mem = mem;
                Assert.True(_fd >= 0, "eventfd failed");
            }

            public int Throws { get; private set; }

            public override int CompletionFd => _fd;

            public override void Prepare(ref Sqe sqe, in BackendRequest request) => throw new NotSupportedException();

            public override int Submit(int tag, in BackendRequest request)
            {
                var r = request.Op switch
                {
                    UblkSharp.Ublk.IoOp.Read => _mem.Read(new Span<byte>(request.Buffer, (int)request.Length), request.Offset),
                    UblkSharp.Ublk.IoOp.Write => _mem.Write(new ReadOnlySpan<byte>(request.Buffer, (int)request.Length), request.Offset),
                    UblkSharp.Ublk.IoOp.Flush => 0,
                    UblkSharp.Ublk.IoOp.Discard => _mem.Discard(request.Offset, request.Length),
                    UblkSharp.Ublk.IoOp.WriteZeroes => _mem.WriteZeroes(request.Offset, request.Length, true),
                    _ => -Errno.EOPNOTSUPP,
                };
                _done.Enqueue((tag, r));
                var one = 1ul;
                Assert.Equal(8, (int)Libc.write(_fd, &one, 8));
                return 0;
            }

            public override int Reap(Span<int> tags, Span<int> results)
            {
                if (++_calls % 5 == 0)
                {
                    Throws++;
                    throw new InvalidOperationException("reap failed");
                }
                var n = 0;
                while (n < tags.Length && _done.TryDequeue(out var d))
                {
                    tags[n] = d.Tag;
                    results[n] = d.Result;
                    n++;
                    if (!_doubled && _calls > 50 && n < tags.Length)
                    {
                        // The same tag once more: a second commit, were the queue to believe it.
                        _doubled = true;
                        tags[n] = d.Tag;
                        results[n] = d.Result;
                        n++;
                    }
                }
                return n;
            }

            protected override void Dispose(bool disposing)
            {
                _ = Libc.close(_fd);
                base.Dispose(disposing);
            }
        }
    }
}
