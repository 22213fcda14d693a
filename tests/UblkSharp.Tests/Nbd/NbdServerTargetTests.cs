using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using UblkSharp.Tests.Targets;

namespace UblkSharp.Tests.Nbd;

/// <summary>What the server owes its targets and clients: no bytes from another request in a reply, wrappers work, and no target is closed under a call.</summary>
[Collection(nameof(NbdSerialCollection))]
public class NbdServerTargetTests
{
    private static readonly int[] Sizes = [4096, 65536, 262144, 1 << 20];

    private static NbdClient Connect(TestServer s) => NbdClient.Connect(NbdUri.Unix(s.SocketPath), TimeSpan.FromSeconds(30));

    [Fact]
    public void NullReadsNeverCarryOtherClientsWrites()
    {
        // Two clients write and go; their buffers go back to the shared pool; a third one reads.
        using var s = new TestServer(new NullTarget(1L << 30));
        for (var c = 0; c < 2; c++)
        {
            using var writer = Connect(s);
            var data = new byte[1 << 20];
            Array.Fill(data, (byte)(0xa5 + c));
            for (var i = 0; i < 120; i++)
            {
                var size = Sizes[i % Sizes.Length];
                Assert.Equal(0, writer.Write(data.AsSpan(0, size), (long)i * (1 << 20), fua: false));
            }
        }
        Assert.True(Poll.Until(() => s.Server.ActiveConnections == 0, TimeSpan.FromSeconds(30)), "the writers' connections did not close");
        using var reader = Connect(s);
        var back = new byte[1 << 20];
        var dirty = 0;
        for (var i = 0; i < 240; i++)
        {
            var size = Sizes[i % Sizes.Length];
            Array.Fill(back, (byte)0x11);
            Assert.Equal(0, reader.Read(back.AsSpan(0, size), (long)i * (1 << 20)));
            if (back.AsSpan(0, size).ContainsAnyExcept((byte)0))
            {
                dirty++;
            }
        }
        Assert.True(dirty == 0, $"{dirty} of 240 null reads returned bytes that were not zeros");
    }

    [Fact]
    public void AUsersWrapperAroundMemWorksOverNbd()
    {
        var wrapper = new WrapperTargetTests.CountingWrapper(new MemoryTarget(16 << 20));
        using var s = new TestServer(wrapper);
        Assert.Equal(new MemoryTarget(4096).CanFastZero, s.Export.CanFastZero);
        using var client = Connect(s);
        Assert.True(client.CanTrim);
        var data = LoopTargetTests.Pattern(65536, 9);
        Assert.Equal(0, client.Write(data, 8192, fua: false));
        var back = new byte[data.Length];
        Assert.Equal(0, client.Read(back, 8192));
        Assert.Equal(data, back);
        Assert.Equal(0, client.WriteZeroes(8192, 4096, mayUnmap: true, fua: false, fast: false));
        Assert.Equal(0, client.Read(back, 8192));
        Assert.All(back.AsSpan(0, 4096).ToArray(), b => Assert.Equal(0, b));
        Assert.Equal(1, wrapper.Writes);
        // The wrapper's filter saw the steps, though the server knows nothing of its type.
        Assert.True(wrapper.Filtered >= 4, $"the filter saw {wrapper.Filtered} steps");
    }

    [Fact]
    public void FaultsOfAWrappedFaultTargetAreRetriedOverNbd()
    {
        // A user's wrapper around the fault target: the faults still apply, and are retried.
        var wrapper = new WrapperTargetTests.CountingWrapper(new FaultTarget(new MemoryTarget(16 << 20), new FaultSchedule { Seed = 5, ShortIo = 0.3, Again = 0.3 }));
        using var s = new TestServer(wrapper);
        using var client = Connect(s);
        var data = LoopTargetTests.Pattern(256 << 10, 4);
        var back = new byte[data.Length];
        for (var i = 0; i < 20; i++)
        {
            Assert.Equal(0, client.Write(data, i * (long)data.Length, fua: false));
            Assert.Equal(0, client.Read(back, i * (long)data.Length));
            Assert.Equal(data, back);
        }
        Assert.True(wrapper.Writes > 20, $"{wrapper.Writes} writes for 20 requests: no short write was retried");
    }

    [Fact]
    public void ATargetIsNeverDisposedWhileACallIsInIt()
    {
        using var target = new SlowTarget();
        var s = new TestServer(target, options: new NbdServerOptions { StopTimeout = TimeSpan.FromMilliseconds(200), Execution = NbdExecution.Workers }, ownsTarget: false);
        try
        {
            var client = Connect(s);
            var reader = new Thread(() =>
            {
                try
                {
                    client.Read(new byte[4096], 0);
                }
                catch (Exception e) when (e is IOException or ObjectDisposedException)
                {
                }
            });
            reader.Start();
            Assert.True(Poll.Until(() => target.InCall, TimeSpan.FromSeconds(30)), "the read never reached the target");

            s.Server.Dispose(); // gives up waiting after 200 ms, with the call still running
            Assert.True(target.InCall);
            Assert.False(s.Server.IsIdle);
            Assert.False(s.Server.ReleaseWhenIdle(target));
            Assert.False(target.Disposed);

            target.Finish();
            Assert.True(Poll.Until(() => target.Disposed, TimeSpan.FromSeconds(30)), "the target was not disposed once its call returned");
            Assert.False(target.DisposedDuringCall);
            Assert.True(s.Server.IsIdle);
            Assert.True(reader.Join(TimeSpan.FromSeconds(30)));
            client.Dispose();
        }
        finally
        {
            target.Finish();
            s.Dispose();
        }
    }

    /// <summary>A target whose reads wait for the test, and which notes a dispose that comes during a call.</summary>
    private sealed class SlowTarget : BlockTarget
    {
        private readonly ManualResetEventSlim _finish = new();
        private volatile bool _inCall;

        public bool InCall => _inCall;

        public bool Disposed { get; private set; }

        public bool DisposedDuringCall { get; private set; }

        public override long Size => 1 << 20;

        public override string Kind => "slow";

        public void Finish() => _finish.Set();

        public override int Read(Span<byte> buffer, long offset)
        {
            _inCall = true;
            _finish.Wait(TimeSpan.FromMinutes(2));
            buffer.Clear();
            _inCall = false;
            return buffer.Length;
        }

        protected override void Dispose(bool disposing)
        {
            DisposedDuringCall |= _inCall;
            Disposed = true;
            base.Dispose(disposing);
        }
    }
}

/// <summary>Polls a condition within a generous bound (the machine is loaded): never a fixed sleep.</summary>
internal static class Poll
{
    public static bool Until(Func<bool> condition, TimeSpan limit)
    {
        var deadline = Environment.TickCount64 + (long)limit.TotalMilliseconds;
        while (!condition())
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }
            Thread.Sleep(10);
        }
        return true;
    }
}
