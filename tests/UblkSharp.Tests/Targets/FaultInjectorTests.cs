using UblkSharp.Interop;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Targets;

public class FaultInjectorTests
{
    private static readonly FaultSchedule Mixed = new() { Seed = 42, ShortIo = 0.3, Again = 0.2, Eio = 0.1, Delay = 0.25, DelayMs = 7 };

    private static int[] Draws(FaultSchedule schedule, int queue, int count)
    {
        var f = new FaultInjector(schedule, queue);
        var r = new int[count];
        for (var i = 0; i < count; i++)
        {
            r[i] = i % 3 == 0 ? (int)f.DrawDelay().TotalMilliseconds : f.Apply(65536, isData: i % 2 == 0, 512);
        }
        return r;
    }

    [Fact]
    public void SameSeedAndQueueRepeat()
    {
        Assert.Equal(Draws(Mixed, 3, 10_000), Draws(Mixed, 3, 10_000));
    }

    [Fact]
    public void QueuesAndSeedsDrawDifferently()
    {
        var q0 = Draws(Mixed, 0, 1000);
        Assert.NotEqual(q0, Draws(Mixed, 1, 1000));
        Assert.NotEqual(Draws(Mixed, 1, 1000), Draws(Mixed, 2, 1000));
        Assert.NotEqual(q0, Draws(Mixed with { Seed = 43 }, 0, 1000));
    }

    [Fact]
    public void RatesAreRoughlyHonoured()
    {
        const int n = 100_000, size = 65536;
        var f = new FaultInjector(Mixed, 0);
        int eio = 0, again = 0, shortened = 0, whole = 0, delayed = 0;
        for (var i = 0; i < n; i++)
        {
            var r = f.Apply(size, isData: true, 512);
            switch (r)
            {
                case -Errno.EIO: eio++; break;
                case -Errno.EAGAIN: again++; break;
                case size: whole++; break;
                default: shortened++; break;
            }
            if (f.DrawDelay() == TimeSpan.FromMilliseconds(7))
            {
                delayed++;
            }
        }
        Assert.InRange(eio, 0.08 * n, 0.12 * n);
        Assert.InRange(again, 0.18 * n, 0.22 * n);
        Assert.InRange(shortened, 0.28 * n, 0.32 * n);
        Assert.InRange(whole, 0.38 * n, 0.42 * n);
        Assert.InRange(delayed, 0.23 * n, 0.27 * n);
        Assert.Equal(eio + again + shortened + delayed, f.Injected);
    }

    [Theory]
    [InlineData(65536, 512)]
    [InlineData(65536, 4096)]
    [InlineData(1024, 512)]
    [InlineData(513, 512)]
    [InlineData(100_000, 4096)]
    public void ShortResultsAreAlignedPositiveAndShorter(int result, int blockSize)
    {
        var f = new FaultInjector(new FaultSchedule { Seed = 9, ShortIo = 1 }, 0);
        var seen = new HashSet<int>();
        for (var i = 0; i < 20_000; i++)
        {
            var r = f.Apply(result, isData: true, blockSize);
            Assert.True(r > 0 && r < result, $"{r} from {result}");
            Assert.Equal(0, r % blockSize);
            seen.Add(r);
        }
        // The whole range is drawn from: one block up to one block fewer than the result's whole blocks.
        Assert.Contains(blockSize, seen);
        Assert.Contains(Math.Max(1, (result / blockSize) - 1) * blockSize, seen);
        Assert.Equal(20_000, f.Injected);
    }

    [Theory]
    [InlineData(512, true)]
    [InlineData(100, true)]
    [InlineData(0, true)]
    [InlineData(65536, false)]
    public void OnlyDataStepsLongerThanABlockAreShortened(int result, bool isData)
    {
        var f = new FaultInjector(new FaultSchedule { ShortIo = 1 }, 0);
        for (var i = 0; i < 1000; i++)
        {
            Assert.Equal(result, f.Apply(result, isData, 512));
        }
        Assert.Equal(0, f.Injected);
    }

    [Fact]
    public void EioAndEagainOnlyWhenAsked()
    {
        var shortOnly = new FaultInjector(new FaultSchedule { ShortIo = 1, Delay = 1 }, 0);
        var none = new FaultInjector(new FaultSchedule(), 0);
        for (var i = 0; i < 50_000; i++)
        {
            Assert.True(shortOnly.Apply(65536, isData: true, 512) > 0);
            Assert.True(shortOnly.Apply(0, isData: false, 512) == 0);
            Assert.Equal(65536, none.Apply(65536, isData: true, 512));
            Assert.Equal(TimeSpan.Zero, none.DrawDelay());
        }
        Assert.Equal(0, none.Injected);

        var eioOnly = new FaultInjector(new FaultSchedule { Eio = 1 }, 0);
        var againOnly = new FaultInjector(new FaultSchedule { Again = 1 }, 0);
        for (var i = 0; i < 1000; i++)
        {
            Assert.Equal(-Errno.EIO, eioOnly.Apply(4096, isData: false, 512));
            Assert.Equal(-Errno.EAGAIN, againOnly.Apply(4096, isData: true, 512));
        }
    }

    [Fact]
    public void NegativeResultsPassThroughUntouched()
    {
        var all = new FaultSchedule { Seed = 5, Eio = 0.3, Again = 0.3, ShortIo = 0.3 };
        var f = new FaultInjector(all, 0);
        var twin = new FaultInjector(all, 0);
        foreach (var errno in new[] { Errno.EIO, Errno.ENOSPC, Errno.EAGAIN, Errno.EOPNOTSUPP, Errno.EINVAL })
        {
            for (var i = 0; i < 100; i++)
            {
                Assert.Equal(-errno, f.Apply(-errno, isData: true, 512));
            }
        }
        Assert.Equal(0, f.Injected);
        // ... and draw nothing: the schedule after them is the one without them.
        for (var i = 0; i < 1000; i++)
        {
            Assert.Equal(twin.Apply(65536, true, 512), f.Apply(65536, true, 512));
        }
    }

    [Fact]
    public void ScheduleAcceptsTheBounds()
    {
        new FaultSchedule { ShortIo = 0, Again = 1, Eio = 1, Delay = 0.5, DelayMs = 0 }.Validate();
        new FaultSchedule { DelayMs = 60_000 }.Validate();
        Assert.True(new FaultSchedule { Again = 1 }.IsRetryableOnly);
        Assert.False(new FaultSchedule { Eio = 0.001 }.IsRetryableOnly);
    }

    public static TheoryData<string, double> BadRates => new()
    {
        { "short", -0.01 }, { "short", 1.01 }, { "eagain", double.NaN }, { "eio", double.PositiveInfinity },
        { "delay", double.NegativeInfinity }, { "delay", 2 },
    };

    [Theory]
    [MemberData(nameof(BadRates))]
    public void ScheduleRejectsBadRates(string name, double rate)
    {
        var s = name switch
        {
            "short" => new FaultSchedule { ShortIo = rate },
            "eagain" => new FaultSchedule { Again = rate },
            "eio" => new FaultSchedule { Eio = rate },
            _ => new FaultSchedule { Delay = rate },
        };
        var e = Assert.Throws<ArgumentOutOfRangeException>(s.Validate);
        Assert.Equal(name, e.ParamName);
        Assert.StartsWith($"The {name} fault rate must be between 0 and 1", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentOutOfRangeException>(() => new FaultTarget(new NullTarget(4096), s));
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(60_001)]
    [InlineData(int.MaxValue)]
    public void ScheduleRejectsBadDelays(int ms)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(new FaultSchedule { DelayMs = ms }.Validate);
        Assert.StartsWith("The fault delay must be 0 to 60000 ms", e.Message, StringComparison.Ordinal);
    }

    private sealed class Tracked : BlockTarget
    {
        public bool Disposed { get; private set; }

        public override long Size => 8192;

        public override string Kind => "tracked";

        public override int Read(Span<byte> buffer, long offset) => buffer.Length;

        protected override void Dispose(bool disposing)
        {
            Disposed = true;
            base.Dispose(disposing);
        }
    }

    [Fact]
    public void FaultTargetIsItsInnerTarget()
    {
        using var inner = new MemoryTarget(1 << 20);
        var f = new FaultTarget(inner, Mixed);
        Assert.Equal(inner.Size, f.Size);
        Assert.Equal("fault", f.Kind);
        Assert.False(f.IsReadOnly);
        Assert.True(f.CanDiscard);
        Assert.False(f.HasVolatileCache);
        Assert.Null(f.CreateUringBackend(0));
        Assert.Equal("mem", f.Recipe["base"]);
        Assert.Equal("1048576", f.Recipe["size"]);
        Assert.Equal("42", f.Recipe["seed"]);
        Assert.Equal("0.25", f.Recipe["delay"]);
        Assert.Equal("7", f.Recipe["delay-ms"]);

        // The data path is the inner target's, untouched: faults are the runtime's to apply.
        var data = LoopTargetTests.Pattern(8192, 1);
        Assert.Equal(8192, f.Write(data, 4096));
        var back = new byte[8192];
        Assert.Equal(8192, inner.Read(back, 4096));
        Assert.Equal(data, back);
        Assert.Equal(0, f.Discard(4096, 4096));
        Assert.Equal(8192, f.Read(back, 4096));
        Assert.All(back.AsSpan(0, 4096).ToArray(), x => Assert.Equal(0, x));

        // Each queue gets its own injector, repeatable from the schedule.
        Assert.Equal(Draws(Mixed, 1, 100), Draws(f.Schedule, 1, 100));
        var a = f.CreateInjector(1);
        var b = new FaultInjector(Mixed, 1);
        for (var i = 0; i < 100; i++)
        {
            Assert.Equal(b.Apply(65536, true, 512), a.Apply(65536, true, 512));
        }

        var tracked = new Tracked();
        new FaultTarget(tracked, new FaultSchedule()).Dispose();
        Assert.True(tracked.Disposed);
        Assert.True(new FaultTarget(new Tracked(), new FaultSchedule()).IsReadOnly);
    }
}
