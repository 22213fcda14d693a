using UblkSharp.Targets;

namespace UblkSharp.Tests.Rbd;

/// <summary>The rbd target's options, checked before any cluster is contacted.</summary>
public class RbdFactoryTests
{
    [Theory]
    [InlineData("image=x", "the rbd target needs --pool POOL")]
    [InlineData("pool=rbd", "the rbd target needs --image IMAGE")]
    [InlineData("pool=rbd image=x conf=/nonexistent/ceph.conf", "/nonexistent/ceph.conf: no such Ceph configuration file")]
    [InlineData("pool=rbd image=x timeout=0", "bad --timeout '0': give at least 1 second")]
    [InlineData("pool=rbd image=x timeout=soon", "bad --timeout 'soon': give a whole number")]
    [InlineData("pool=rbd image=x keyring=/etc/hostname keyfile=/etc/hostname", "--keyring and --keyfile exclude each other: give one")]
    [InlineData("pool=rbd image=x keyfile=/nonexistent/key", "--keyfile /nonexistent/key: no such file")]
    [InlineData("pool=rbd image=x snap-id=first", "bad --snap-id 'first': give the snapshot's number, as `rbd snap ls` shows it")]
    [InlineData("pool=rbd image=x snap=a snap-id=4", "--snap and --snap-id exclude each other: give one")]
    [InlineData("pool=rbd image=x cache=writeback", "bad --rbd-cache 'writeback': use default, writethrough or none")]
    [InlineData("pool=rbd image=x encryption-format=luks2", "--encryption-format and --passphrase-file go together: give both")]
    [InlineData("pool=rbd image=x encryption-format=aes passphrase-file=/etc/hostname", "bad --encryption-format 'aes': use luks1 or luks2")]
    [InlineData("pool=rbd image=x encryption-format=luks1 passphrase-file=/nonexistent/pass", "--passphrase-file /nonexistent/pass: no such file")]
    public void Bad_options_say_what_is_wrong(string options, string message)
    {
        var o = options.Split(' ').Select(kv => kv.Split('=')).ToDictionary(kv => kv[0], kv => kv[1]);
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("rbd", o));
        Assert.Equal(message, e.Message);
    }

    /// <summary>
    /// The factory builds the rbd target for real (it reaches librados), and a cluster whose
    /// monitor does not answer is a clear error within about --timeout, not a hang. The monitor
    /// address is a closed loopback port.
    /// </summary>
    [Fact]
    public void Rbd_kind_reaches_librados_and_an_unreachable_cluster_fails_within_the_timeout()
    {
        using var conf = new TempFile();
        File.WriteAllText(conf.Path, "[global]\nmon_host = 127.0.0.1:1\n");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var e = Assert.Throws<IOException>(() => TargetFactory.Create("rbd", new Dictionary<string, string>
        {
            ["pool"] = "rbd",
            ["image"] = "x",
            ["conf"] = conf.Path,
            ["timeout"] = "2",
        }).Dispose());
        Assert.StartsWith($"cannot connect to the Ceph cluster of {conf.Path} as client.admin: ", e.Message, StringComparison.Ordinal);
        // Generous for a loaded machine; without the timeout librados waits 300 s.
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"took {sw.Elapsed.TotalSeconds:F1} s");
    }

    [Theory]
    [InlineData("6.12.118", true)]
    [InlineData("6.15.2", true)]
    [InlineData("6.16.0", false)]
    [InlineData("7.3.0", false)]
    [InlineData("5.19.0", true)]
    public void A_resize_names_6_16_as_the_first_kernel_that_can_grow_the_device(string kernel, bool before) =>
        Assert.Equal(before, RbdTarget.KernelBefore616(Version.Parse(kernel)));
}
