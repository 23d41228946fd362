package main

// Fetch of an unset property.
//
// pyvmomi reads a single property (vm.snapshot, vm.parentVApp, ...) with the
// PropertyCollector's Fetch method. In govmomi 0.24.2 the simulator's Fetch indexes
// an empty result when the property is unset (a nil pointer or an empty string, e.g.
// VirtualMachine.snapshot with no snapshot), panics, and the client sees the
// connection closed without a response. vCenter answers such a Fetch with an empty
// FetchResponse (pyvmomi: None); fetchFixPC does the same and leaves every other
// Fetch to the simulator. Disable with -stock-fetch to reproduce the original.

import (
	"reflect"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

// fetchFixPC replaces the root PropertyCollector. It embeds the simulator's type by
// value: Session.Get makes each session's collector with reflect.New of the
// registered type, so a zero value must be a working collector.
type fetchFixPC struct {
	simulator.PropertyCollector
}

// FetchResponse is named so the response element is <FetchResponse>.
type FetchResponse struct {
	Returnval types.AnyType `xml:"returnval,omitempty,typeattr"`
}

type fetchBody struct {
	Res    *FetchResponse `xml:"FetchResponse,omitempty"`
	Fault_ *soap.Fault    `xml:"http://schemas.xmlsoap.org/soap/envelope/ Fault,omitempty"`
}

func (b *fetchBody) Fault() *soap.Fault { return b.Fault_ }

func installFetchFix(ref types.ManagedObjectReference) {
	pc := &fetchFixPC{}
	pc.Self = ref
	simulator.Map.Put(pc)
}

// Fetch takes the request as interface{}: its type lives in the simulator's internal
// package. The dispatcher calls methods by reflection, which accepts this.
func (pc *fetchFixPC) Fetch(ctx *simulator.Context, req interface{}) soap.HasFault {
	rv := reflect.ValueOf(req).Elem()
	this, _ := rv.FieldByName("This").Interface().(types.ManagedObjectReference)
	prop := rv.FieldByName("Prop").String()

	if this != vim25.ServiceInstance && ctx.Map.Get(this) != nil {
		res := pc.RetrievePropertiesEx(ctx, &types.RetrievePropertiesEx{
			SpecSet: []types.PropertyFilterSpec{{
				PropSet:   []types.PropertySpec{{Type: this.Type, PathSet: []string{prop}}},
				ObjectSet: []types.ObjectSpec{{Obj: this}},
			}},
		})
		if body, ok := res.(*methods.RetrievePropertiesExBody); ok && body.Res != nil && body.Res.Returnval != nil {
			objs := body.Res.Returnval.Objects
			if len(objs) == 1 && len(objs[0].PropSet) == 0 && len(objs[0].MissingSet) == 0 {
				return &fetchBody{Res: &FetchResponse{}} // unset
			}
		}
	}

	out := reflect.ValueOf(&pc.PropertyCollector).MethodByName("Fetch").Call(
		[]reflect.Value{reflect.ValueOf(ctx), reflect.ValueOf(req)},
	)
	return out[0].Interface().(soap.HasFault)
}
