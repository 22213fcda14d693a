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
    public void Bad_options_say_what_is_wrong(string options, string message)
    {
        var o = options.Split(' ').Select(kv => kv.Split('=')).ToDictionary(kv => kv[0], kv => kv[1]);
        var e = Assert.Throws<ArgumentException>(() => TargetFactory.Create("rbd", o));
        Assert.Equal(message, e.Message);
    }

    [Fact]
    public void Rbd_is_a_known_kind() => Assert.Contains("rbd", TargetFactory.Kinds);
}
